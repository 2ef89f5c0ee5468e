"""The VAE around our calls (engine.sd.vae): its sizes chosen from the free memory, its state kept
after an error inside a pipeline, and SDXL's empty negative prompt left to diffusers' default."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from engine.inversion.data import encode_images, load_images
from engine.sd.generation import default_batch, generation_scheduler, render, sample_prompt
from engine.sd.vae import (
    DECODE_ELEMENTS_PER_PIXEL,
    ENCODE_CHUNK,
    ENCODE_ELEMENTS_PER_PIXEL,
    USABLE,
    VaePlan,
    activation_bytes,
    plan_for,
    plan_vae,
)

GIB = 2**30
FP32 = 4


# --- sizes from the resolution and the free memory -----------------------------------------------


def test_the_estimate_is_what_the_released_vae_layout_keeps_alive():
    """The constants are the measured peak live activations of SDXL's VAE (SD 1.x/2.x share its
    layout) at 1024 px, counted op by op on meta tensors (bench/vae_activations.py)."""
    from bench.vae_activations import SDXL_VAE, build_vae, per_pixel

    row = per_pixel(build_vae(SDXL_VAE), 1024)
    assert row["encode_bytes_per_pixel"] == pytest.approx(ENCODE_ELEMENTS_PER_PIXEL * FP32, rel=0.01)
    assert row["decode_bytes_per_pixel"] == pytest.approx(DECODE_ELEMENTS_PER_PIXEL * FP32, rel=0.01)


def test_sdxl_at_1024_px_with_24_gib_free_encodes_fewer_at_once_and_fits():
    batch = default_batch(1024, 1024)
    plan = plan_vae(1024, 1024, FP32, 24 * GIB, batch)
    encode, decode = activation_bytes(1024, 1024, FP32)
    budget = 24 * GIB * USABLE
    assert ENCODE_CHUNK * encode > budget  # today's 8 at once would not fit: the bug
    assert 1 <= plan.encode_chunk < ENCODE_CHUNK and plan.encode_chunk * encode <= budget
    assert plan.decode_batch * decode <= budget and not plan.tiling
    assert plan.describe()["free_bytes"] == 24 * GIB


def test_a_24_gb_card_holding_sdxl_decodes_its_batch_one_image_at_a_time():
    plan = plan_vae(1024, 1024, FP32, 16 * GIB, 4)  # ~7 GiB of the card hold the fp16 model
    _, decode = activation_bytes(1024, 1024, FP32)
    assert 4 * decode > 16 * GIB * USABLE
    assert plan.slicing and plan.decode_batch == 1 and plan.batch == 4 and not plan.tiling
    assert decode <= 16 * GIB * USABLE


def test_when_one_image_does_not_fit_it_goes_in_tiles_that_do():
    plan = plan_vae(1024, 1024, FP32, 3 * GIB, 1)
    _, tile_bytes = activation_bytes(plan.tile, plan.tile, FP32)
    assert plan.tiling and plan.encode_chunk == 1
    assert plan.tile % 64 == 0 and 128 <= plan.tile < 1024 and tile_bytes <= 3 * GIB * USABLE


def test_512_px_with_80_gib_free_keeps_todays_sizes():
    plan = plan_vae(512, 512, FP32, 80 * GIB, default_batch(512, 512))
    assert (plan.encode_chunk, plan.batch, plan.decode_batch) == (ENCODE_CHUNK, 4, 4)
    assert not plan.slicing and not plan.tiling


def test_tiny_images_keep_big_batches():
    plan = plan_vae(64, 64, FP32, 2 * GIB, default_batch(64, 64))
    assert (plan.encode_chunk, plan.batch, plan.decode_batch) == (ENCODE_CHUNK, 16, 16)
    assert not plan.slicing and not plan.tiling


def test_on_a_cpu_nothing_is_limited(tiny_model):
    plan = plan_for(tiny_model, 1024, 1024, 4)  # no free-memory figure on a CPU: today's sizes
    assert plan.free_bytes is None
    assert (plan.encode_chunk, plan.decode_batch, plan.slicing, plan.tiling) == (ENCODE_CHUNK, 4, False, False)


def test_the_latent_cache_is_encoded_in_the_plans_chunks(sdxl_model, image_dir):
    vae = copy.deepcopy(sdxl_model.vae)
    images = load_images(sorted(image_dir.glob("*.png")))  # 3 images and their mirrors: 6
    whole = encode_images(vae, images, 64)
    sizes = []
    vae.encoder.register_forward_pre_hook(lambda _m, args: sizes.append(args[0].shape[0]))
    plan = VaePlan(4, 1, 1, False, False, None, 10 * GIB, 1, 1)
    chunked = encode_images(vae, images, 64, plan=plan)
    assert sizes == [4, 2]
    assert torch.allclose(chunked.mean, whole.mean, atol=1e-5) and torch.allclose(chunked.std, whole.std, atol=1e-5)


def test_slicing_and_tiling_hold_during_the_decode_only(sdxl_model):
    model = copy.copy(sdxl_model)
    model.pipe = copy.copy(sdxl_model.pipe)  # the same modules but its own VAE: the fixture stays as it was
    vae = model.pipe.vae = copy.deepcopy(sdxl_model.vae)
    seen = []
    vae.decoder.register_forward_pre_hook(
        lambda _m, args: seen.append((args[0].shape[0], vae.use_slicing, vae.use_tiling, vae.tile_latent_min_size)))
    before = (vae.use_slicing, vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size)
    plan = VaePlan(8, 2, 1, True, True, 32, 1, 1, 1)
    render(model, "a photo", [0, 1], steps=1, batch_size=2, output_type="np", vae_plan=plan)
    # one image per decode (slicing); tiles of 32 px = 16 latents (the tiny VAE downsamples by 2)
    assert seen and all(s == (1, True, True, 16) for s in seen)
    assert (vae.use_slicing, vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size) == before


# --- an error inside the pipeline leaves the VAE as it was (fp16 SDXL, upcast for the decode) ----


@pytest.fixture(scope="module")
def sdxl_fp16():
    """builtin:sdxl-tiny in fp16 (the CPU runs its convolutions): its VAE is upcast for decode."""
    from engine.sd.models import load_model

    return load_model("builtin:sdxl-tiny", dtype=torch.float16)


def _decode_fails_once(vae, seen: list):
    """Make the VAE's next decode raise, as an OOM would, after diffusers' upcast."""
    def failing(*args, **kwargs):
        seen.append(vae.dtype)
        del vae.decode  # the class's own decode again, for the next call
        raise torch.OutOfMemoryError("injected: out of memory during the VAE decode")
    vae.decode = failing


@pytest.mark.parametrize("call", ["render", "preview"])
def test_an_error_during_sdxl_decode_leaves_the_vae_in_fp16(sdxl_fp16, call):
    model, vae = sdxl_fp16, sdxl_fp16.vae
    tokenizers = [tok for _, tok in model.encoders]
    # 32 px, one step: fp16 convolutions are slow on a CPU
    run = {"render": lambda: render(model, "a photo", [0], steps=1, resolution=32, output_type="np"),
           "preview": lambda: sample_prompt(model, "a photo", tokenizers, seeds=[0], steps=1, resolution=32)}[call]
    assert vae.dtype == torch.float16 and vae.config.force_upcast
    seen = []
    _decode_fails_once(vae, seen)
    with pytest.raises(torch.OutOfMemoryError):
        run()
    assert seen == [torch.float32]  # it failed after diffusers' upcast ...
    assert all(p.dtype == torch.float16 for p in vae.parameters())  # ... and the VAE is fp16 again
    images = run()  # the warm model still generates
    assert len(images) == 1 and vae.dtype == torch.float16


# --- SDXL's empty negative prompt: diffusers' default ---------------------------------------------


@pytest.mark.parametrize("spec", ["builtin:tiny", "builtin:sdxl-tiny"])
def test_an_empty_negative_prompt_gives_diffusers_default_images_bit_for_bit(spec, tiny_model, sdxl_model):
    """No negative prompt means diffusers' default: for SDXL, zeros (force_zeros_for_empty_prompt),
    not the encoded empty string; SD 1.x/2.x encode "" either way."""
    model = sdxl_model if spec == "builtin:sdxl-tiny" else tiny_model
    pipe = model.family.pipeline(model, generation_scheduler(model), [tok for _, tok in model.encoders])
    seeds, size = [3, 4], model.info.resolution

    def diffusers(**negative):
        return pipe("a photo of a cat", num_images_per_prompt=2, num_inference_steps=2, guidance_scale=7.5,
                    generator=[torch.Generator().manual_seed(s) for s in seeds], height=size, width=size,
                    output_type="np", **negative).images

    ours = np.stack(render(model, "a photo of a cat", seeds, negative="", steps=2, batch_size=2, output_type="np"))
    assert np.array_equal(ours, diffusers())
    if model.family.name == "sdxl":  # the test can tell: "" is another conditioning for SDXL
        assert not np.array_equal(ours, diffusers(negative_prompt=""))


def test_the_run_header_says_how_the_vae_encoded(tiny_model, image_dir, tmp_path):
    from engine.inversion.train import QuietReporter, TrainConfig, train

    reporter = QuietReporter()
    cfg = TrainConfig(token="<cat>", init="cat", steps=1, save_every=1, preview_every=0, log_every=1)
    train(tiny_model, cfg, tmp_path / "run", sorted(image_dir.glob("*.png")), reporter)
    [header] = [e for e in reporter.events if e["type"] == "train"]
    size = tiny_model.info.resolution
    assert header["vae"] == plan_for(tiny_model, size, size, 1).describe()
    assert header["vae"]["encode_chunk"] == ENCODE_CHUNK and header["vae"]["free_bytes"] is None


def test_each_image_record_says_how_the_vae_decoded_it(tiny_model, tmp_path):
    import json

    from engine.sd.generation import GenerateRequest, generate
    from engine.store.library import Library

    request = GenerateRequest("a photo of a cat", n=2, steps=1, out_dir=str(tmp_path / "out"))
    results = generate(tiny_model, Library(tmp_path / "home"), request)
    size = tiny_model.info.resolution
    expected = plan_for(tiny_model, size, size, default_batch(size, size)).decoding()
    for result in results:
        record = json.loads(open(result["json"]).read())
        assert record["vae"] == expected == {"decode_batch": 16, "slicing": False, "tiling": False, "tile": None}
