"""The inversion: it learns, it freezes what it must, it resumes exactly."""

from __future__ import annotations

import pytest
import torch

from engine.errors import JobCancelled, UserError
from engine.inversion.train import QuietReporter, RunSlot, TrainConfig, train, train_many
from engine.sd.formats import read_embedding
from engine.store import checkpoints


def _images(image_dir):
    return sorted(image_dir.glob("*.png"))


def _cfg(**kw):
    base = dict(token="<thing>", init="cat", steps=20, save_every=10, preview_every=0, log_every=5)
    base.update(kw)
    return TrainConfig(**base)


def _frozen_snapshot(model):
    return {
        name: t.detach().clone()
        for module in ("unet", "vae", "text_encoder")
        for name, t in getattr(model, module).state_dict().items()
    }


def test_overfit_one_latent_loss_falls_and_only_new_row_moves(tiny_model, image_dir, tmp_path):
    before = _frozen_snapshot(tiny_model)
    # One latent, one timestep, one noise, one template: the loss is a deterministic
    # function of the vector.  A random tiny UNet listens to text only a little, so
    # the fall is small, but it must be steady (an untrained vector gives equal losses).
    cfg = _cfg(steps=60, lr=5e-2, fixed_timestep=500, fixed_noise=True, flip_p=0.0, save_every=60,
               log_every=10, templates=["a photo of a {}"])
    reporter = QuietReporter()
    out = train(tiny_model, cfg, tmp_path / "run", _images(image_dir)[:1], reporter)
    losses = [e["loss"] for e in reporter.events if e["type"] == "step"]
    assert losses[0] > losses[1] > losses[2], losses
    assert losses[-1] < losses[0] - 2e-4, losses
    after = _frozen_snapshot(tiny_model)
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), f"{name} changed"
    learned = read_embedding(out)
    init_row = tiny_model.text_encoder.get_input_embeddings().weight[
        tiny_model.tokenizer("cat", add_special_tokens=False).input_ids[0]
    ]
    assert learned.vectors.shape == (1, tiny_model.info.text_width)
    assert not torch.equal(learned.vectors[0], init_row.float())
    assert learned.token == "<thing>"


def test_run_directory_layout(tiny_model, image_dir, tmp_path):
    run = tmp_path / "run"
    train(tiny_model, _cfg(steps=10, save_every=5, preview_every=10, preview_steps=2), run, _images(image_dir))
    assert (run / "learned_embeds.safetensors").is_file()
    assert (run / "embeddings" / "learned_embeds-steps-5.safetensors").is_file()
    assert (run / "previews" / "step-10.png").is_file()
    assert [c.step for c in checkpoints.list_checkpoints(run)] == [5, 10]


class _CancelAt(QuietReporter):
    def __init__(self, after_steps):
        super().__init__()
        self.after = after_steps

    def cancelled(self):
        return sum(1 for e in self.events if e["type"] == "step") * 5 >= self.after


def test_cancel_then_resume_equals_uninterrupted_bit_for_bit(tiny_model, image_dir, tmp_path):
    images = _images(image_dir)
    full = read_embedding(train(tiny_model, _cfg(seed=7), tmp_path / "full", images)).vectors
    with pytest.raises(JobCancelled):
        train(tiny_model, _cfg(seed=7), tmp_path / "cut", images, _CancelAt(after_steps=15))
    assert checkpoints.latest(tmp_path / "cut").step == 15  # cancel leaves a checkpoint where it stopped
    resumed = read_embedding(train(tiny_model, _cfg(seed=7), tmp_path / "cut", images)).vectors
    assert torch.equal(full, resumed)


def test_resume_from_periodic_checkpoint_after_partial_checkpoint_dir(tiny_model, image_dir, tmp_path):
    images = _images(image_dir)
    full = read_embedding(train(tiny_model, _cfg(seed=3), tmp_path / "full", images)).vectors
    with pytest.raises(JobCancelled):
        train(tiny_model, _cfg(seed=3), tmp_path / "cut", images, _CancelAt(after_steps=10))
    # a kill -9 in the middle of the next checkpoint write leaves a hidden temp folder
    (tmp_path / "cut" / "checkpoints" / ".step-20.abc").mkdir()
    resumed = read_embedding(train(tiny_model, _cfg(seed=3), tmp_path / "cut", images)).vectors
    assert torch.equal(full, resumed)
    assert not (tmp_path / "cut" / "checkpoints" / ".step-20.abc").exists()


def test_different_seeds_differ(tiny_model, image_dir, tmp_path):
    images = _images(image_dir)
    a = read_embedding(train(tiny_model, _cfg(seed=1, steps=5), tmp_path / "a", images)).vectors
    b = read_embedding(train(tiny_model, _cfg(seed=2, steps=5), tmp_path / "b", images)).vectors
    assert not torch.equal(a, b)


def test_batched_runs_equal_their_solo_runs(tiny_model, image_dir, tmp_path):
    images = _images(image_dir)
    cfgs = [_cfg(seed=1, steps=10), _cfg(seed=2, steps=10, init="dog")]
    solo = [read_embedding(train(tiny_model, c, tmp_path / f"solo{i}", images)).vectors for i, c in enumerate(cfgs)]
    slots = [RunSlot(c, tmp_path / f"batch{i}", images) for i, c in enumerate(cfgs)]
    batched = [read_embedding(p).vectors for p in train_many(tiny_model, slots)]
    for s, b in zip(solo, batched):
        torch.testing.assert_close(s, b, rtol=1e-4, atol=1e-5)


def test_bad_initializer_and_settings_are_user_errors(tiny_model, image_dir, tmp_path):
    images = _images(image_dir)
    with pytest.raises(UserError, match="single-token"):
        train(tiny_model, _cfg(init="photosynthesis"), tmp_path / "x", images)
    with pytest.raises(UserError, match="--steps"):
        train(tiny_model, _cfg(steps=0), tmp_path / "y", images)



def test_an_unknown_prediction_type_is_refused_before_training(tiny_model, image_dir, tmp_path, monkeypatch):
    real = type(tiny_model).noise_scheduler

    def sample_predicting(model):
        scheduler = real(model)
        scheduler.register_to_config(prediction_type="sample")
        return scheduler

    monkeypatch.setattr(type(tiny_model), "noise_scheduler", sample_predicting)
    with pytest.raises(UserError, match="predicts 'sample'; only epsilon and v_prediction"):
        train(tiny_model, _cfg(), tmp_path / "run", _images(image_dir))
    assert not (tmp_path / "run" / "checkpoints").exists()

def test_nan_loss_stops_and_keeps_last_good_embedding(tiny_model, image_dir, tmp_path, monkeypatch):
    from engine.inversion import train as train_mod

    images = _images(image_dir)
    real = train_mod.Inversion._loss_rows
    calls = {"n": 0}

    def poisoned(self, batch):
        calls["n"] += 1
        loss = real(self, batch)
        return loss * float("nan") if calls["n"] > 12 else loss

    monkeypatch.setattr(train_mod.Inversion, "_loss_rows", poisoned)
    with pytest.raises(FloatingPointError, match="NaN"):
        train(tiny_model, _cfg(steps=20, save_every=10, log_every=5), tmp_path / "run", images)
    good = tmp_path / "run" / "embeddings" / "learned_embeds-steps-10.safetensors"
    assert torch.isfinite(read_embedding(good).vectors).all()
    assert not (tmp_path / "run" / "learned_embeds.safetensors").exists()


def test_low_vram_checkpointing_gives_the_same_run(tiny_model, image_dir, tmp_path):
    images = _images(image_dir)
    plain = read_embedding(train(tiny_model, _cfg(steps=5), tmp_path / "a", images)).vectors
    low = read_embedding(train(tiny_model, _cfg(steps=5, low_vram=True), tmp_path / "b", images)).vectors
    torch.testing.assert_close(plain, low, rtol=1e-5, atol=1e-6)
    assert not tiny_model.unet.is_gradient_checkpointing  # the shared model is left as it was


# --- SDXL: one word in both text encoders ------------------------------------------------------------


def test_sdxl_trains_the_word_in_both_encoders_and_freezes_everything_else(sdxl_model, image_dir, tmp_path):
    modules = ("unet", "vae", "text_encoder", "text_encoder_2")
    before = {f"{m}.{k}": v.clone() for m in modules for k, v in getattr(sdxl_model.pipe, m).state_dict().items()}
    reporter = QuietReporter()
    out = train(sdxl_model, _cfg(steps=6, lr=5e-2, save_every=6), tmp_path / "run", _images(image_dir), reporter)
    after = {f"{m}.{k}": v for m in modules for k, v in getattr(sdxl_model.pipe, m).state_dict().items()}
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, changed
    learned = read_embedding(out)
    assert learned.widths == (32, 64) and learned.format == "sdxl"  # one clip_l + clip_g file per run
    for (encoder, tokenizer), block in zip(sdxl_model.encoders, learned.blocks):
        [cat] = tokenizer("cat", add_special_tokens=False).input_ids
        assert not torch.equal(block[0], encoder.get_input_embeddings().weight[cat].float())
    header = next(e for e in reporter.events if e["type"] == "train")
    assert (header["family"], header["widths"], header["vectors"]) == ("sdxl", [32, 64], 1)


def test_sdxl_low_vram_gives_the_same_run(sdxl_model, image_dir, tmp_path):
    images = _images(image_dir)
    plain = read_embedding(train(sdxl_model, _cfg(steps=3), tmp_path / "a", images))
    low = read_embedding(train(sdxl_model, _cfg(steps=3, low_vram=True), tmp_path / "b", images))
    for a, b in zip(plain.blocks, low.blocks):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not sdxl_model.unet.is_gradient_checkpointing


# --- gradient accumulation, keeping checkpoints, starting from an embedding -----------------------------


def _one_sample(**kw):
    """One latent, timestep, noise and template: every micro-batch is the same sample."""
    return _cfg(steps=4, save_every=4, lr=5e-2, fixed_timestep=500, fixed_noise=True, flip_p=0.0,
                templates=["a photo of a {}"], **kw)


def test_grad_accum_averages_micro_batches(tiny_model, image_dir, tmp_path):
    one = _images(image_dir)[:1]
    plain = read_embedding(train(tiny_model, _one_sample(), tmp_path / "a", one)).vectors
    # two identical micro-batches averaged give the same gradient, bit for bit (a sum would not)
    accum = read_embedding(train(tiny_model, _one_sample(grad_accum=2), tmp_path / "b", one)).vectors
    assert torch.equal(plain, accum)
    # with random draws, the second micro-batch changes the result
    images = _images(image_dir)
    a = read_embedding(train(tiny_model, _cfg(steps=4, seed=1), tmp_path / "c", images)).vectors
    b = read_embedding(train(tiny_model, _cfg(steps=4, seed=1, grad_accum=2), tmp_path / "d", images)).vectors
    assert not torch.equal(a, b)


def test_grad_accum_resumes_bit_exact_and_reports_the_effective_batch(tiny_model, image_dir, tmp_path):
    images = _images(image_dir)
    cfg = {"seed": 9, "grad_accum": 3, "batch_size": 2, "steps": 10, "save_every": 5}
    reporter = QuietReporter()
    full = read_embedding(train(tiny_model, _cfg(**cfg), tmp_path / "full", images, reporter)).vectors
    header = next(e for e in reporter.events if e["type"] == "train")
    assert (header["batch_size"], header["grad_accum"], header["effective_batch"]) == (2, 3, 6)
    with pytest.raises(JobCancelled):
        train(tiny_model, _cfg(**cfg), tmp_path / "cut", images, _CancelAt(after_steps=5))
    resumed = read_embedding(train(tiny_model, _cfg(**cfg), tmp_path / "cut", images)).vectors
    assert torch.equal(full, resumed)


def test_effective_batch_in_the_run_record(tiny_model, image_dir):
    from engine.store.library import Library
    from engine.store.paths import home_dir
    from engine.store.runs import create_run, load_run
    from engine.worker.context import JobContext
    from engine.worker.job_kinds import handle_train

    home = home_dir()
    Library(home).add("toy", image_dir, "cat")
    params = {"steps": 2, "save_every": 2, "preview_every": 0, "log_every": 1, "batch_size": 2, "grad_accum": 2}
    spec = {"kind": "train", "concept": "toy", "params": params}
    run_dir = create_run(home, spec)
    ctx = JobContext(spec, run_dir.name, run_dir, home)
    ctx.cache["model"] = (("builtin:tiny", "cpu", "torch.float32"), tiny_model)
    handle_train(ctx)
    ctx.flush()
    assert load_run(run_dir)["effective_batch"] == 4


def test_keep_checkpoints_prunes_the_oldest_and_resume_is_unaffected(tiny_model, image_dir, tmp_path):
    images = _images(image_dir)
    cfg = {"steps": 12, "save_every": 2, "seed": 5}
    full = read_embedding(train(tiny_model, _cfg(**cfg), tmp_path / "full", images)).vectors
    with pytest.raises(JobCancelled):
        train(tiny_model, _cfg(**cfg, keep_checkpoints=2), tmp_path / "cut", images, _CancelAt(after_steps=5))
    assert [c.step for c in checkpoints.list_checkpoints(tmp_path / "cut")] == [4, 5]
    # a kill in the middle of a prune leaves a hidden folder; resume ignores and clears it
    (tmp_path / "cut" / "checkpoints" / ".pruned-step-2").mkdir()
    resumed = read_embedding(train(tiny_model, _cfg(**cfg, keep_checkpoints=1), tmp_path / "cut", images)).vectors
    assert torch.equal(full, resumed)
    assert [c.step for c in checkpoints.list_checkpoints(tmp_path / "cut")] == [12]
    assert not (tmp_path / "cut" / "checkpoints" / ".pruned-step-2").exists()
    # the embeddings of every saved step stay (the steps ablation reads them)
    assert len(list((tmp_path / "cut" / "embeddings").glob("*.safetensors"))) == 6


def test_init_from_a_file_in_any_layout(tiny_model, image_dir, tmp_path):
    from engine.inversion.train import Inversion
    from engine.sd.formats import write_embedding

    start = torch.randn(2, 32, generator=torch.Generator().manual_seed(3))
    source = write_embedding(tmp_path / "from-a1111.pt", start, "other", "a1111")
    slot = RunSlot(_cfg(vectors=2, init_from=str(source)), tmp_path / "run", _images(image_dir))
    assert torch.equal(Inversion(tiny_model, [slot]).vectors.detach()[0], start.reshape(-1))
    out = read_embedding(train(tiny_model, _cfg(vectors=2, init_from=str(source), steps=2, save_every=2),
                               tmp_path / "run2", _images(image_dir)))
    assert out.num_vectors == 2 and not torch.equal(out.vectors, start)


def test_init_from_a_library_run_and_step(tiny_model, image_dir, tmp_path):
    from engine.inversion.train import Inversion
    from engine.store.library import Library
    from engine.store.paths import atomic_write_json, home_dir

    library = Library(home_dir())
    concept = library.add("toy", image_dir, "cat")
    run_dir = concept.runs_dir / "r1"
    train(tiny_model, _cfg(steps=4, save_every=2), run_dir, concept.images)
    atomic_write_json(run_dir / "run.json", {"id": "r1", "status": "done", "created": 1.0, "steps": 4})
    at_2 = read_embedding(run_dir / "embeddings" / "learned_embeds-steps-2.safetensors").vectors
    inv = Inversion(tiny_model, [RunSlot(_cfg(init_from="toy@r1:2"), tmp_path / "run", concept.images)])
    assert torch.equal(inv.vectors.detach()[0], at_2[0])
    with pytest.raises(UserError, match="no embedding at step 3"):
        Inversion(tiny_model, [RunSlot(_cfg(init_from="toy@r1:3"), tmp_path / "x", concept.images)])


def test_init_from_must_fit_family_and_vectors(tiny_model, sdxl_model, image_dir, tmp_path):
    from engine.inversion.train import Inversion
    from engine.sd.formats import write_embedding

    images = _images(image_dir)
    one = write_embedding(tmp_path / "one.safetensors", torch.randn(1, 32), "<a>")
    xl = write_embedding(tmp_path / "xl.safetensors", (torch.randn(2, 32), torch.randn(2, 64)), "<a>", "kohya")
    with pytest.raises(UserError, match=r"holds 1 vector\(s\) per encoder but --vectors is 2; pass --vectors 1"):
        Inversion(tiny_model, [RunSlot(_cfg(vectors=2, init_from=str(one)), tmp_path / "a", images)])
    expected = r"for widths 32 \+ 64 does not fit builtin:tiny, a model of SD 1.x \(width 32\)"
    with pytest.raises(UserError, match=expected):
        Inversion(tiny_model, [RunSlot(_cfg(vectors=2, init_from=str(xl)), tmp_path / "b", images)])
    with pytest.raises(UserError, match="no such file, and not NAME@RUN:STEP"):
        Inversion(tiny_model, [RunSlot(_cfg(init_from=str(tmp_path / "missing.pt")), tmp_path / "c", images)])
    inv = Inversion(sdxl_model, [RunSlot(_cfg(vectors=2, init_from=str(xl)), tmp_path / "d", images)])
    blocks = inv.layout.split(inv.vectors.detach()[0])
    assert torch.equal(blocks[1], read_embedding(xl).vectors_2)
