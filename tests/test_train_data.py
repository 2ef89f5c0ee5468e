"""Training on data the way the other tools take it (issue 26): captions in the prompts (ours
and A1111's `[filewords]`), kohya's masked loss, aspect-ratio buckets, and OneTrainer's EMA."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from engine.errors import JobCancelled, UserError
from engine.inversion import buckets
from engine.inversion.data import OBJECT_TEMPLATES, size_conditioning
from engine.inversion.ema import WordEMA
from engine.inversion.staging import Staging
from engine.inversion.train import Inversion, QuietReporter, RunSlot, TrainConfig, train
from engine.sd.formats import read_embedding
from engine.settings.prompts import load_templates
from engine.store import checkpoints
from engine.store.library import Library


def _cfg(**kw):
    return TrainConfig(**{"token": "<ball>", "init": "cat", "steps": 4, "save_every": 2, "preview_every": 0,
                          "log_every": 2, **kw})


def _picture(path, size, alpha=None, seed=0):
    rng = np.random.RandomState(seed)
    pixels = (rng.rand(size[1], size[0], 3) * 255).astype("uint8")
    Image.fromarray(pixels if alpha is None else np.dstack([pixels, alpha])).save(path)
    return path


@pytest.fixture
def kohya_concept(tmp_path):
    """A concept added from a kohya-layout folder: `.txt` captions beside two images, an alpha mask
    on one (its right half trains), and a mask folder with another's mask (left half trains)."""
    folder, masks = tmp_path / "train", tmp_path / "masks"
    folder.mkdir()
    masks.mkdir()
    _picture(folder / "a.png", (64, 64), seed=1)
    (folder / "a.txt").write_text("a red ball on a sofa\n", encoding="utf-8")
    alpha = np.zeros((64, 64), dtype="uint8")
    alpha[:, 32:] = 255
    _picture(folder / "b.png", (64, 64), alpha=alpha, seed=2)
    _picture(folder / "c.png", (64, 64), seed=3)
    (folder / "c.txt").write_text("beside a window", encoding="utf-8")
    mask = np.zeros((64, 64, 3), dtype="uint8")
    mask[:, :32] = 255
    Image.fromarray(mask).save(masks / "c.png")
    return Library(tmp_path / "home").add("ball", folder, "ball", masks=masks)


def _inversion(model, concept, tmp_path, **kw) -> Inversion:
    reporter = QuietReporter()
    return Inversion(model, [RunSlot(_cfg(**kw), tmp_path / "run", concept.images, reporter)])


def _one_draw(inv: Inversion, k: int = 0):
    staging = Staging()
    run = inv._draw_run(k, staging)
    parts = staging.unpack(staging.pack(pin=False))
    return run, parts, inv._assemble([run], parts)


# --- captions ------------------------------------------------------------------------------------


def test_an_a1111_templates_file_with_filewords_puts_each_image_caption_in_its_prompts(
        tiny_model, kohya_concept, tmp_path):
    path = tmp_path / "subject_filewords.txt"
    path.write_text("a photo of a [name], [filewords]\n[filewords], a rendering of [name]\n", encoding="utf-8")
    templates = load_templates(path)
    assert templates == ["a photo of a {}, {caption}", "{caption}, a rendering of {}"]
    inv = _inversion(tiny_model, kohya_concept, tmp_path, templates=templates)
    data = inv.data[0]
    assert data.per_image and data.captioned == 2 and data.templates == 2
    assert data.prompts == [  # image-major; an image without a caption drops its place and comma
        "a photo of a <ball>, a red ball on a sofa", "a red ball on a sofa, a rendering of <ball>",
        "a photo of a <ball>", "a rendering of <ball>",
        "a photo of a <ball>, beside a window", "beside a window, a rendering of <ball>"]
    for _ in range(6):  # every draw trains an image under a prompt of its own caption
        run, parts, batch = _one_draw(inv)
        image, row = int(parts[run["index"]][0]), int(parts[run["template"]][0])
        assert row // 2 == image
        for e, ids in enumerate(inv.prompt_ids[0]):
            assert torch.equal(batch.ids[e][0], ids[row])


def test_with_no_captions_the_study_templates_stay_and_with_captions_they_take_the_caption(
        tiny_model, image_dir, kohya_concept, tmp_path):
    plain = Inversion(tiny_model, [RunSlot(_cfg(), tmp_path / "plain", sorted(image_dir.glob("*.png")))])
    assert not plain.data[0].per_image and plain.data[0].prompts == [t.format("<ball>") for t in OBJECT_TEMPLATES]
    captioned = _inversion(tiny_model, kohya_concept, tmp_path)
    assert captioned.data[0].prompts[0] == "a photo of a <ball>, a red ball on a sofa"  # A1111's subject_filewords
    assert captioned.data[0].prompts[len(OBJECT_TEMPLATES)] == "a photo of a <ball>"  # b: no caption
    header = []
    captioned.slots[0].reporter = type("R", (QuietReporter,), {"emit": lambda s, t, **f: header.append(f)})()
    captioned._header()
    assert header[0]["prompts"] == captioned.data[0].prompts and header[0]["captioned"] == 2


def test_a_caption_that_pushes_the_word_out_of_the_prompt_is_refused(tiny_model, kohya_concept, tmp_path):
    Library(tmp_path / "home").set_caption("ball", "000.png", " ".join(["ball"] * 90))
    with pytest.raises(UserError, match="caption of 000.png pushes the word past the text encoder's 77 tokens"):
        _inversion(tiny_model, kohya_concept, tmp_path, templates=["{caption}, a photo of {}"])
    _inversion(tiny_model, kohya_concept, tmp_path, templates=["a photo of {}, {caption}"])  # cut after it: fine


# --- masks ---------------------------------------------------------------------------------------


def test_masked_loss_weights_each_latent_pixel_by_the_mask_brought_down_by_area(tiny_model, kohya_concept, tmp_path):
    inv = _inversion(tiny_model, kohya_concept, tmp_path, masked_loss=True, flip_p=0.0)
    data = inv.data[0]
    assert data.masked == 2
    masks = data.buckets[0].cache.masks  # [images, flips, 1, 32, 32]: the tiny VAE halves 64 px
    assert masks.shape == (3, 2, 1, 32, 32)
    assert (masks[0] == 1).all()  # a: no mask, counts whole
    assert (masks[1, 0, 0, :, 17:] == 1).all() and (masks[1, 0, 0, :, :15] == 0).all()  # alpha: right half
    assert (masks[2, 0, 0, :, :15] == 1).all() and (masks[2, 0, 0, :, 17:] == 0).all()  # mask file: left half
    assert torch.equal(masks[1, 1], masks[1, 0].flip(-1))  # mirrored with its image
    for _ in range(4):
        run, parts, batch = _one_draw(inv)
        assert torch.equal(batch.weights, masks[parts[run["index"]], parts[run["flip"]]])
        losses = {}
        with inv.installed():
            for name, weights in [("masked", batch.weights), ("ones", torch.ones_like(batch.weights)),
                                  ("plain", None), ("zeros", torch.zeros_like(batch.weights))]:
                batch.weights = weights
                losses[name] = inv._loss_rows(batch).item()
        assert losses["ones"] == losses["plain"] and losses["zeros"] == 0.0  # kohya: loss * mask, a plain mean
        masked_image = int(parts[run["index"]][0]) > 0
        assert losses["masked"] < losses["plain"] if masked_image else losses["masked"] == losses["plain"]


def test_without_masked_loss_the_masks_are_not_read(tiny_model, kohya_concept, tmp_path):
    inv = _inversion(tiny_model, kohya_concept, tmp_path)
    assert inv.data[0].masked == 0 and inv.data[0].buckets[0].cache.masks is None
    assert _one_draw(inv)[2].weights is None


# --- buckets -------------------------------------------------------------------------------------


def test_buckets_follow_kohya_at_512_px():
    sizes = buckets.bucket_sizes(512, 64)
    kohya = [(256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576),
             (512, 512)]  # make_bucket_resolutions((512, 512)), and each one's transpose
    assert sizes == sorted(set(kohya) | {(h, w) for w, h in kohya})
    placed = buckets.fit(1000, 600, sizes)  # 5:3 -> (640, 384), scaled to cover, nothing to crop
    assert placed == buckets.Fit((640, 384), (640, 384), (0, 0))
    placed = buckets.fit(1200, 600, sizes)  # 2:1 -> (704, 320), wider: cover by width, crop the height centred
    assert placed == buckets.Fit((704, 320), (704, 352), (0, 16)) and placed.box == (0, 16, 704, 336)
    # SDXL's size conditioning: the source size, the crop, the bucket (kohya's)
    assert size_conditioning(Image.new("RGB", (1200, 600)), 512, fit=placed) == [600, 1200, 16, 0, 320, 704]


def test_bucket_steps_are_64_px_on_sd_and_the_model_unit_on_the_small_ones():
    from engine.sd.models import model_info

    steps = {spec: buckets.info_step(model_info(spec))
             for spec in ("builtin:tiny", "builtin:demo", "builtin:sd15-arch", "builtin:sdxl-arch")}
    assert steps == {"builtin:tiny": 4, "builtin:demo": 8, "builtin:sd15-arch": 64, "builtin:sdxl-arch": 64}
    with pytest.raises(UserError, match="steps of 64 px on this model, not 520; give --resolution 512"):
        buckets.bucket_sizes(520, 64)
    with pytest.raises(UserError, match="no sizes but the square"):
        buckets.bucket_sizes(64, 64)


@pytest.fixture
def shapes_dir(tmp_path):
    folder = tmp_path / "shapes"
    folder.mkdir()
    for i, size in enumerate([(128, 64), (64, 128), (64, 64), (130, 66)]):
        _picture(folder / f"s{i}.png", size, seed=i)
    return sorted(folder.glob("*.png"))


def test_buckets_keep_each_image_shape_and_a_batch_never_mixes_sizes(tiny_model, shapes_dir, tmp_path):
    inv = Inversion(tiny_model, [RunSlot(_cfg(buckets=True, batch_size=2), tmp_path / "run", shapes_dir)])
    # tiny: 64 px in steps of 4; 2:1 and 130:66 both nearest 88×44 (2.0), at the area of 64² or under it
    assert inv.data[0].describe()["buckets"] == [{"width": 44, "height": 88, "images": 1},
                                                 {"width": 64, "height": 64, "images": 1},
                                                 {"width": 88, "height": 44, "images": 2}]
    for bucket in inv.data[0].buckets:  # latents cached per bucket, at its size (the tiny VAE halves)
        assert tuple(bucket.cache.mean.shape[-2:]) == (bucket.size[1] // 2, bucket.size[0] // 2)
    seen = set()
    for _ in range(12):
        run, parts, batch = _one_draw(inv)
        bucket = inv.data[0].buckets[run["bucket"]]
        assert batch.latents.shape[0] == 2 and tuple(batch.latents.shape[-2:]) == tuple(bucket.cache.mean.shape[-2:])
        seen.add(bucket.size)
    assert len(seen) == 3  # every bucket is drawn
    with pytest.raises(UserError, match="--buckets trains one run at a time"):
        Inversion(tiny_model, [RunSlot(_cfg(buckets=True, seed=s), tmp_path / f"r{s}", shapes_dir) for s in (1, 2)])


# --- EMA -----------------------------------------------------------------------------------------


def test_the_ema_follows_onetrainer_schedule():
    ema = WordEMA(0.99, torch.zeros(1, 2))
    assert ema.rate(0) == pytest.approx(1 - 1 / 10) and ema.rate(1000) == pytest.approx(0.01)
    ema.update(torch.ones(1, 2), 0)
    assert torch.allclose(ema.rows, torch.full((1, 2), 0.9))
    vectors = torch.full((1, 2), 5.0)
    with ema.shown(vectors):
        assert torch.equal(vectors, ema.rows)
    assert torch.equal(vectors, torch.full((1, 2), 5.0))


class _CancelAt(QuietReporter):
    def __init__(self, steps):
        super().__init__()
        self.steps = steps

    def cancelled(self):
        return sum(e["type"] == "step" for e in self.events) * 2 >= self.steps


def test_buckets_masks_captions_and_ema_resume_bit_for_bit(tiny_model, shapes_dir, tmp_path):
    """A run with every issue-26 setting, cancelled and resumed, ends where the uninterrupted one
    does; its saved word is the moving average, which the checkpoint keeps."""
    (shapes_dir[0].with_suffix(".txt")).write_text("a wide one", encoding="utf-8")
    settings = dict(steps=4, save_every=2, buckets=True, masked_loss=True, ema=0.9, batch_size=2, seed=5)
    full = read_embedding(train(tiny_model, _cfg(**settings), tmp_path / "full", shapes_dir)).vectors
    with pytest.raises(JobCancelled):
        train(tiny_model, _cfg(**settings), tmp_path / "cut", shapes_dir, _CancelAt(2))
    assert checkpoints.latest(tmp_path / "cut").step == 2
    resumed = read_embedding(train(tiny_model, _cfg(**settings), tmp_path / "cut", shapes_dir)).vectors
    assert torch.equal(full, resumed)
    from safetensors.torch import load_file

    state = load_file(str(checkpoints.latest(tmp_path / "full").path / "state.safetensors"))
    assert torch.equal(full, state["ema"][0].view_as(full)) and not torch.equal(full, state["vector"][0].view_as(full))


def test_a_checkpoint_from_before_ema_starts_the_average_from_its_vectors(tiny_model, image_dir, tmp_path):
    images = sorted(image_dir.glob("*.png"))
    train(tiny_model, _cfg(steps=2), tmp_path / "run", images)
    inv = Inversion(tiny_model, [RunSlot(_cfg(steps=4, ema=0.5), tmp_path / "run", images)])
    assert inv.resume() == 2
    assert torch.equal(inv.ema.rows, inv.vectors.detach())


def test_bad_settings_name_their_option():
    for settings, words in [({"ema": 1.5}, "--ema must be a decay between 0 and 1"),
                            ({"ema": 0}, "--ema must be"),
                            ({"buckets": True, "center_crop": True}, "--buckets keeps each image's aspect ratio"),
                            ({"buckets": True, "compile": "default"}, "drop --compile"),
                            ({"masked_loss": "yes"}, "--masked-loss is on or off")]:
        with pytest.raises(UserError, match=words):
            _cfg(**settings).validate()


def test_a_bucketed_masked_captioned_step_still_reaches_the_device_in_one_upload(tiny_model, shapes_dir, tmp_path):
    """Issue 23's rule with issue 26's data: the bucket is a host number, the prompt row and the
    mask index ride in the step's one upload, and every resident tensor (each bucket's latents
    and masks, the per-image prompts) is indexed only with uploaded indices."""
    from test_train_on_gpu_rules import _Provenance

    shapes_dir[1].with_suffix(".txt").write_text("a tall one", encoding="utf-8")
    inv = Inversion(tiny_model, [RunSlot(_cfg(buckets=True, masked_loss=True, grad_accum=2, batch_size=2),
                                         tmp_path / "run", shapes_dir)])
    assert inv.data[0].per_image
    resident = [t for b in inv.data[0].buckets for t in (b.cache.mean, b.cache.std, b.cache.masks)]
    watcher = _Provenance(resident + list(inv.prompt_ids[0]))
    uploads, real_upload, real_draw = [], inv._upload, inv._draw

    def upload(host):
        watcher.uploading = True
        try:
            out = real_upload(host)
        finally:
            watcher.uploading = False
        watcher.mark(out)
        uploads.append(host.numel())
        return out

    def draw(*args):
        with watcher:
            return real_draw(*args)

    inv._upload, inv._draw = upload, draw
    with inv.installed():
        for step in range(2):
            inv.train_step(step)
    assert len(uploads) == 2 and watcher.moves == [] and watcher.host_indices == []


def test_a_sweep_trains_bucketed_members_in_turn_and_run_json_records_the_data(tmp_path):
    """The worker's side: members with --buckets are batched one per run (each draws its own
    image size), and the header's account of the data lands in run.json."""
    from engine.store.runs import create_run
    from engine.worker.sweeps import ContextReporter, _batches

    home = tmp_path / "home"
    Library(home).add("ball", None, "ball")
    plain = [create_run(home, {"kind": "train", "concept": "ball", "params": {"seed": s}}) for s in (1, 2)]
    bucketed = [create_run(home, {"kind": "train", "concept": "ball", "params": {"seed": s, "buckets": True}})
                for s in (1, 2)]
    assert _batches(plain) == [plain]
    assert _batches(bucketed) == [[bucketed[0]], [bucketed[1]]]

    class Context:
        def __init__(self):
            self.events, self.fields = [], {}

        def emit(self, type, **fields):
            self.events.append(type)

        def set_progress(self, **fields):
            self.fields.update(fields)

    ctx = Context()
    data = {"images": 4, "masked": 1, "captioned": 2, "buckets": [{"width": 88, "height": 44, "images": 4}]}
    ContextReporter(ctx).emit("train", step=0, steps=4, prompts=["a photo of <ball>"], **data)
    assert ctx.events == ["train"] and ctx.fields == {"data": data}


def test_the_deterministic_loss_takes_a_bucketed_run(tiny_model, shapes_dir, tmp_path):
    """Issue 25's fixed batch is the loop's own draws: with --buckets its micro-batches are of
    several sizes, measured one by one (before, joining them failed at the run's start)."""
    from engine.inversion.probes import DeterministicLoss

    inv = Inversion(tiny_model, [RunSlot(_cfg(buckets=True, seed=3), tmp_path / "run", shapes_dir)])
    fixed = DeterministicLoss(inv)
    assert len({tuple(b.latents.shape) for b in fixed.batches}) > 1
    with inv.installed():
        first = fixed.values()
        assert fixed.values() == first and len(first) == 1 and first[0] > 0


def test_probes_and_previews_see_the_word_as_saved_with_ema(tiny_model, image_dir, tmp_path, monkeypatch):
    """With --ema the saved steps are the average: the probes that choose the best step (issue
    25) and the previews look at that word, and the vectors trained come back after."""
    from engine.inversion import probes
    from engine.inversion import train as train_mod

    seen = {}

    def probe(self, ks, step):
        seen[f"probe {step}"] = self.inv.vectors.detach().clone()
        return [{"type": "probe-seen", "step": step} for _ in ks]

    def preview(inversion, step):
        seen[f"preview {step}"] = inversion.vectors.detach().clone()

    monkeypatch.setattr(probes.Prober, "judge_for", staticmethod(lambda model: "a judge"))
    monkeypatch.setattr(probes.Prober, "probe", probe)
    monkeypatch.setattr(train_mod, "preview", preview)
    cfg = _cfg(steps=2, save_every=2, ema=0.5, probe_every=2, preview_every=2, dloss_every=0)
    saved = read_embedding(train(tiny_model, cfg, tmp_path / "run", sorted(image_dir.glob("*.png")))).vectors
    assert set(seen) == {"probe None", "probe 2", "preview 2"}  # (None: the SD row, at the start)
    assert torch.equal(seen["probe 2"].view_as(saved), saved) and torch.equal(seen["preview 2"].view_as(saved), saved)
    from safetensors.torch import load_file

    trained = load_file(str(checkpoints.latest(tmp_path / "run").path / "state.safetensors"))["vector"]
    assert not torch.equal(trained.view_as(saved), saved)  # the vectors trained differ from the average
