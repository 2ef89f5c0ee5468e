"""Model specs per family: SDXL (builtin, diffusers folder, single file, hub cache), single-file SD 1.x/2.x
in the original layout, SD 2.x tokenization, and clear refusals for refiners and other families."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from ldm_layout import pipeline_to_single_file
from safetensors.torch import save_file

from engine.errors import NotSupportedError, UserError
from engine.sd.models import family_from_keys, load_model, load_tokenizer, model_info

SPECS = {"sd1": "builtin:tiny", "sd2": "builtin:sd2-tiny", "sdxl": "builtin:sdxl-tiny"}


def _components(pipe, family):
    return ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if family == "sdxl" else [])


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_single_file_in_the_original_layout_equals_the_diffusers_folder_it_came_from(family, tmp_path):
    """A diffusers folder (save_pretrained) written out as one original-layout checkpoint
    (model.diffusion_model.*, first_stage_model.*, and the family's text-encoder keys) loads
    offline from the bundled configs with every tensor equal."""
    source = load_model(SPECS[family])
    folder = tmp_path / "folder"
    source.pipe.save_pretrained(folder)
    from_folder = load_model(str(folder))
    checkpoint = tmp_path / f"{family}.safetensors"
    save_file(pipeline_to_single_file(from_folder.pipe, family), str(checkpoint))
    info = model_info(str(checkpoint))
    assert (info.kind, info.family, info.text_widths) == ("single_file", family, source.info.text_widths)
    loaded = load_model(str(checkpoint))
    for name in _components(loaded.pipe, family):
        theirs, ours = getattr(from_folder.pipe, name).state_dict(), getattr(loaded.pipe, name).state_dict()
        assert theirs.keys() == ours.keys(), name
        for key in theirs:
            assert torch.equal(theirs[key], ours[key]), f"{name}.{key}"
    assert info.prediction_type == ("v_prediction" if family == "sd2" else "epsilon")
    # every tokenizer pads as the family's own does
    prompts = ["a photo of a cat", "a red teapot on a table, studio light"]
    for (_, ours_tok), (_, theirs_tok) in zip(loaded.encoders, from_folder.encoders):
        assert ours_tok(prompts, padding="max_length", max_length=77).input_ids == \
            theirs_tok(prompts, padding="max_length", max_length=77).input_ids


def test_sd2_prompts_tokenize_as_the_sd2_diffusers_tokenizer_pads_with_bang(tmp_path):
    """SD 2.x's tokenizer pads with '!' (id 0), not <|endoftext|>: built-ins and single files alike."""
    expected = [49406, 320, 1125, 539, 320, 2368, 49407] + [0] * 70  # "a photo of a cat", then "!" padding
    for spec in ("builtin:sd21-arch", "builtin:sd2-tiny"):
        assert load_tokenizer(spec)("a photo of a cat", padding="max_length", max_length=77).input_ids == expected
    assert load_tokenizer("builtin:tiny")("a cat", padding="max_length", max_length=77).input_ids[3:] == [49407] * 74


def test_sdxl_diffusers_folder_trains_and_generates(sdxl_model, tmp_path, image_dir):
    """A folder written by diffusers' own StableDiffusionXLPipeline.save_pretrained."""
    from engine.inversion.train import TrainConfig, train
    from engine.sd.formats import read_embedding
    from engine.sd.generation import render

    assert type(sdxl_model.pipe).__name__ == "StableDiffusionXLPipeline"
    sdxl_model.pipe.save_pretrained(tmp_path / "xl")
    index = json.loads((tmp_path / "xl" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    info = model_info(str(tmp_path / "xl"))
    assert (info.kind, info.family, info.text_widths, info.resolution) == ("diffusers", "sdxl", (32, 64), 64)
    model = load_model(str(tmp_path / "xl"))
    cfg = TrainConfig(token="<t>", init="cat", steps=2, save_every=2, preview_every=0, log_every=1)
    learned = read_embedding(train(model, cfg, tmp_path / "run", sorted(image_dir.glob("*.png"))))
    assert learned.widths == (32, 64)
    [image] = render(model, "a photo of a cat", [0], steps=2)
    assert image.size == (64, 64)


def test_sdxl_hub_id_from_the_local_cache_offline(sdxl_model, tmp_path, monkeypatch):
    import huggingface_hub.constants as c

    hub = tmp_path / "hf" / "hub"
    repo = hub / "models--someone--tiny-xl"
    sdxl_model.pipe.save_pretrained(repo / "snapshots" / ("b" * 40))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("b" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    info = model_info("someone/tiny-xl")
    assert (info.kind, info.family) == ("hub", "sdxl")
    loaded = load_model("someone/tiny-xl")
    assert torch.equal(next(loaded.pipe.text_encoder_2.parameters()), next(sdxl_model.pipe.text_encoder_2.parameters()))


def test_sdxl_arch_has_sdxl_base_shapes():
    """builtin:sdxl-arch is SDXL base 1.0's architecture: its parameter counts, 1024 px (built on the meta device)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    info = model_info("builtin:sdxl-arch")
    assert (info.family, info.text_widths, info.resolution) == ("sdxl", (768, 1280), 1024)
    root = Path(info.location)

    def read(name):
        return json.loads((root / name / "config.json").read_text())

    with torch.device("meta"):
        counts = [sum(p.numel() for p in m.parameters()) for m in (
            UNet2DConditionModel.from_config(read("unet")), AutoencoderKL.from_config(read("vae")),
            CLIPTextModel(CLIPTextConfig(**read("text_encoder"))),
            CLIPTextModelWithProjection(CLIPTextConfig(**read("text_encoder_2"))))]
    assert counts == [2_567_463_684, 83_653_863, 123_060_480, 694_659_840]


def test_family_from_checkpoint_keys_and_refusals():
    xl = ["conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
          "conditioner.embedders.1.model.token_embedding.weight"]
    assert family_from_keys(xl) == "sdxl"
    with pytest.raises(NotSupportedError, match="refiner"):
        family_from_keys(["conditioner.embedders.0.model.token_embedding.weight"])
    with pytest.raises(NotSupportedError, match="SD3/Flux"):
        family_from_keys(["text_encoders.clip_l.transformer.text_model.embeddings.token_embedding.weight"])
    with pytest.raises(NotSupportedError, match="not a Stable Diffusion"):
        family_from_keys(["lora_unet_down.weight"])


def test_refiner_and_other_family_folders_are_refused_clearly(tmp_path):
    cases = {
        "refiner": ({"_class_name": "StableDiffusionXLImg2ImgPipeline", "text_encoder": [None, None],
                     "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                     "requires_aesthetics_score": True}, "refiner"),
        "sd3": ({"_class_name": "StableDiffusion3Pipeline"}, "StableDiffusion3Pipeline models are not supported"),
        "flux": ({"_class_name": "FluxPipeline"}, "FluxPipeline models are not supported"),
    }
    for name, (index, needle) in cases.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "model_index.json").write_text(json.dumps(index))
        with pytest.raises(NotSupportedError, match=needle) as info:
            model_info(str(tmp_path / name))
        assert "\n" not in str(info.value)


def test_single_file_without_a_fitting_bundled_config_is_refused(tmp_path):
    path = tmp_path / "odd.safetensors"
    save_file({"cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(10, 48)},
              str(path))
    with pytest.raises(UserError, match="text width 48, which no bundled config fits"):
        model_info(str(path))


# stabilityai/stable-diffusion-xl-base-1.0's listing (abridged only where folders repeat): ~37 GB in all.
SDXL_BASE_FILES = [
    ".gitattributes", "LICENSE.md", "README.md", "01.png", "model_index.json",
    "sd_xl_base_1.0.safetensors", "sd_xl_base_1.0_0.9vae.safetensors", "sd_xl_offset_example-lora_1.0.safetensors",
    "scheduler/scheduler_config.json",
    *[f"{enc}/{name}" for enc in ("text_encoder", "text_encoder_2") for name in (
        "config.json", "flax_model.msgpack", "model.fp16.safetensors", "model.onnx", "model.safetensors",
        "openvino_model.bin", "openvino_model.xml")],
    *[f"{tok}/{name}" for tok in ("tokenizer", "tokenizer_2") for name in (
        "merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json")],
    "unet/config.json", "unet/diffusion_flax_model.msgpack", "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.safetensors", "unet/model.onnx", "unet/model.onnx_data", "unet/openvino_model.bin",
    *[f"{vae}/{name}" for vae in ("vae", "vae_1_0") for name in (
        "config.json", "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.safetensors")],
    "vae_decoder/config.json", "vae_decoder/model.onnx", "vae_encoder/openvino_model.bin",
]


def test_a_hub_download_fetches_what_the_pipeline_loads_in_one_precision_and_format():
    from engine.sd.models import hub_files

    configs = ["model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
               "text_encoder_2/config.json", *[f"{tok}/{name}" for tok in ("tokenizer", "tokenizer_2") for name in (
                   "merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json")],
               "unet/config.json", "vae/config.json"]
    assert sorted(hub_files(SDXL_BASE_FILES)) == sorted(configs)  # the CLI and the studio: configs alone
    weights = ["text_encoder/model.safetensors", "text_encoder_2/model.safetensors",
               "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"]
    assert sorted(hub_files(SDXL_BASE_FILES, weights=True)) == sorted(configs + weights)
    # An SD 1.x repo of .bin twins, a .bin-only component, a sharded UNet; no safety checker, no root .ckpt.
    sd1 = ["model_index.json", "v1-5-pruned.ckpt", "v1-5-pruned-emaonly.safetensors",
           "safety_checker/config.json", "safety_checker/model.safetensors",
           "feature_extractor/preprocessor_config.json",
           "text_encoder/config.json", "text_encoder/pytorch_model.bin", "text_encoder/pytorch_model.fp16.bin",
           "unet/config.json", "unet/diffusion_pytorch_model.safetensors.index.json",
           "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
           "unet/diffusion_pytorch_model-00002-of-00002.safetensors", "unet/diffusion_pytorch_model.bin",
           "unet/diffusion_pytorch_model.safetensors.index.fp16.json",
           "unet/diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
           "vae/config.json", "vae/diffusion_pytorch_model.bin", "vae/diffusion_pytorch_model.safetensors"]
    assert sorted(hub_files(sd1, weights=True)) == sorted([
        "model_index.json", "text_encoder/config.json", "text_encoder/pytorch_model.bin", "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors.index.json",
        "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
        "unet/diffusion_pytorch_model-00002-of-00002.safetensors", "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors"])


def test_online_the_hub_snapshot_asks_for_the_chosen_files_only(monkeypatch):
    """No network: the listing and the download are stand-ins; what is asked for is the point."""
    import huggingface_hub

    from engine.sd.models import _hub_snapshot

    asked = []
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda self, repo_id: SDXL_BASE_FILES)
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo_id, **kw: asked.append(kw) or "/snapshots/x")
    assert str(_hub_snapshot("stabilityai/stable-diffusion-xl-base-1.0", weights=True)) == "/snapshots/x"
    [kwargs] = asked
    assert "unet/diffusion_pytorch_model.safetensors" in kwargs["allow_patterns"]
    assert not [f for f in kwargs["allow_patterns"] if "fp16" in f or f.endswith((".bin", ".ckpt", ".onnx"))
                or f.startswith("sd_xl")]
