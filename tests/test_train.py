"""The inversion: it learns, it freezes what it must, it resumes exactly."""

from __future__ import annotations

import pytest
import torch

from engine import checkpoints
from engine.errors import JobCancelled, UserError
from engine.formats import read_embedding
from engine.train import QuietReporter, RunSlot, TrainConfig, train, train_many


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
    from engine import train as train_mod

    images = _images(image_dir)
    real = train_mod.Inversion._loss_rows
    calls = {"n": 0}

    def poisoned(self):
        calls["n"] += 1
        loss = real(self)
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
