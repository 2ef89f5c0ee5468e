"""Model specs -> Stable Diffusion components.

A spec is one of:
  builtin:tiny        SD-shaped, random weights from a fixed seed, 64 px; seconds on a CPU
  builtin:demo        a miniature SD trained by this project on its own procedural world (demo/)
  builtin:sd15-arch   SD 1.5's real shapes with random weights (benchmarks, memory checks)
  builtin:sd21-arch   SD 2.1's real shapes (768 px, v-prediction) with random weights
  DIR                 a diffusers folder (model_index.json), as written by save_pretrained
  FILE.safetensors / FILE.ckpt   a single SD 1.x/2.x checkpoint, loaded offline from bundled configs
  owner/name          a hub id, from the local Hugging Face cache (HF_HUB_OFFLINE=1 works)

Everything is returned as a diffusers `StableDiffusionPipeline` (safety checker
off) wrapped in `LoadedModel`, so training, generation and parity tests all
share the exact components diffusers itself would use.

torch is imported inside the functions that load weights: the studio reads
specs, widths and tokenizers from here without paying for torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import NotSupportedError, UserError

CONFIGS = Path(__file__).parent / "configs"
BUILTINS = {"builtin:tiny": "tiny", "builtin:demo": "demo", "builtin:sd15-arch": "sd15", "builtin:sd21-arch": "sd21"}
BUILTIN_SEED = 0
DEFAULT_SPEC = "builtin:tiny"
SDXL_MARKERS = ("StableDiffusionXL", "conditioner.embedders.1", "add_embedding")


@dataclass
class ModelInfo:
    """What a spec is, read from configs alone (no weights): cheap enough for the CLI."""

    spec: str
    kind: str  # builtin | diffusers | single_file | hub
    family: str  # sd1 | sd2
    text_width: int
    prediction_type: str  # epsilon | v_prediction
    resolution: int
    location: str = ""

    def identity(self) -> dict:
        return {
            "spec": self.spec,
            "kind": self.kind,
            "family": self.family,
            "text_width": self.text_width,
            "prediction_type": self.prediction_type,
            "resolution": self.resolution,
            "fingerprint": fingerprint(self),
        }


@dataclass
class LoadedModel:
    info: ModelInfo
    pipe: Any  # diffusers.StableDiffusionPipeline
    device: Any  # torch.device
    dtype: Any  # torch.dtype

    tokenizer = property(lambda self: self.pipe.tokenizer)
    text_encoder = property(lambda self: self.pipe.text_encoder)
    unet = property(lambda self: self.pipe.unet)
    vae = property(lambda self: self.pipe.vae)

    def noise_scheduler(self):
        """The training-time scheduler (DDPM family) from the model's own schedule config."""
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(self.pipe.scheduler.config)


def resolve_spec(spec: str | None) -> str:
    return spec or os.environ.get("TISTUDIO_MODEL") or DEFAULT_SPEC


# --- reading specs without loading weights -------------------------------------------------


def model_info(spec: str | None = None) -> ModelInfo:
    spec = resolve_spec(spec)
    if spec.startswith("builtin:"):
        if spec not in BUILTINS:
            raise UserError(f"unknown built-in model {spec!r}; choose one of {', '.join(BUILTINS)}")
        return _info_from_config_dir(spec, "builtin", CONFIGS / BUILTINS[spec])
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise UserError(f"{spec} is a folder without model_index.json; "
                            "point --model at a diffusers pipeline folder")
        return _info_from_config_dir(spec, "diffusers", path)
    if path.is_file():
        return _single_file_info(spec, path)
    if path.suffix in (".safetensors", ".ckpt") or spec.startswith((".", "/", "~")):
        raise UserError(f"model file {spec} not found; check the path given to --model")
    if spec.count("/") == 1:
        return _info_from_config_dir(spec, "hub", _hub_snapshot(spec))
    raise UserError(
        f"model {spec!r} not understood; give builtin:tiny, a diffusers folder, a .safetensors/.ckpt file or a hub id"
    )


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path}: {exc}; is the model folder complete?") from None


def _info_from_config_dir(spec: str, kind: str, root: Path) -> ModelInfo:
    index = _read_json(root / "model_index.json")
    if any(m in index.get("_class_name", "") for m in SDXL_MARKERS):
        raise NotSupportedError(f"{spec} is an SDXL model; SDXL is not supported yet (SD 1.x and 2.x are)")
    unet = _read_json(root / "unet" / "config.json")
    text = _read_json(root / "text_encoder" / "config.json")
    sched = _read_json(root / "scheduler" / "scheduler_config.json")
    vae = _read_json(root / "vae" / "config.json")
    if unet.get("addition_embed_type") or unet.get("cross_attention_dim") not in (text.get("hidden_size"),):
        raise NotSupportedError(f"{spec} is not an SD 1.x/2.x pipeline; only those are supported yet")
    width = int(text["hidden_size"])
    scale = 2 ** (len(vae.get("block_out_channels", [0])) - 1)
    return ModelInfo(
        spec=spec,
        kind=kind,
        family="sd2" if width == 1024 else "sd1",
        text_width=width,
        prediction_type=sched.get("prediction_type", "epsilon"),
        resolution=int(unet.get("sample_size", 64)) * scale,
        location=str(root),
    )


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    try:
        path = snapshot_download(
            repo_id,
            local_files_only=offline,
            allow_patterns=["*.json", "*.txt", "*.safetensors", "*.bin"],
            ignore_patterns=["*ema*", "*.ckpt", "*fp32*", "safety_checker/*", "*.msgpack", "*.onnx"],
        )
    except Exception as exc:  # noqa: BLE001 - hub errors are many; all mean "not available here"
        hint = "it is not in the local Hugging Face cache" if offline else f"{type(exc).__name__}"
        raise UserError(f"model {repo_id!r} could not be resolved ({hint}); "
                        "download it first or give a local path") from None
    return Path(path)


def _single_file_keys(path: Path) -> list[str]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                return list(fh.keys())
        except Exception:  # noqa: BLE001 - any failure means the file is not a checkpoint we can read
            raise UserError(f"{path} is not a readable .safetensors checkpoint; is the file complete?") from None
    if path.suffix == ".ckpt":
        import torch

        try:
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # noqa: BLE001 - any failure means it cannot be loaded safely
            raise UserError(f"{path} could not be loaded safely (weights_only); convert it to .safetensors") from None
        data = data.get("state_dict", data) if isinstance(data, dict) else {}
        return list(data.keys())
    raise UserError(f"{path}: unknown checkpoint type; use a .safetensors or .ckpt file")


def family_from_keys(keys: list[str]) -> str:
    """Tell SD 1.x from SD 2.x (and refuse SDXL) by the checkpoint's text-encoder keys."""
    joined = set(k.split(".weight")[0] for k in keys)
    if any(k.startswith("conditioner.embedders") for k in joined):
        raise NotSupportedError("this checkpoint is SDXL; SDXL is not supported yet (SD 1.x and 2.x are)")
    if any(k.startswith("cond_stage_model.model.") for k in joined):
        return "sd2"
    if any(k.startswith("cond_stage_model.transformer.") for k in joined):
        return "sd1"
    raise NotSupportedError("this checkpoint is not a Stable Diffusion 1.x/2.x model; only those are supported")


def _single_file_info(spec: str, path: Path) -> ModelInfo:
    family = family_from_keys(_single_file_keys(path))
    info = _info_from_config_dir(spec, "single_file", CONFIGS / ("sd21" if family == "sd2" else "sd15"))
    info.location = str(path)
    return info


def fingerprint(info: ModelInfo) -> str:
    """A short identity for metadata: config hash for built-ins, file sizes/mtimes otherwise."""
    h = hashlib.sha256(f"{info.kind}|{info.spec}|{BUILTIN_SEED}".encode())
    if info.kind != "builtin" and info.location:
        root = Path(info.location)
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for p in files[:200]:
            st = p.stat()
            h.update(f"{p.name}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:16]


# --- loading --------------------------------------------------------------------------------


def load_tokenizer(spec: str | None = None):
    """The model's tokenizer alone (cheap: no weights)."""
    info = model_info(spec)
    if info.kind in ("builtin", "single_file"):
        from engine.tokenizer import load_clip_tokenizer

        return load_clip_tokenizer()
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(info.location, subfolder="tokenizer")


def load_model(spec: str | None = None, device="cpu", dtype=None) -> LoadedModel:
    import torch

    dtype = dtype or torch.float32
    info = model_info(spec)
    loader = {"builtin": _build_builtin, "diffusers": _load_dir, "hub": _load_dir, "single_file": _load_single_file}
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # its dtype-cast notices are noise for our users
    pipe = loader[info.kind](info)
    pipe.set_progress_bar_config(disable=True)
    device = torch.device(device)
    pipe.to(device=device, dtype=dtype)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False)
        module.eval()
    return LoadedModel(info=info, pipe=pipe, device=device, dtype=dtype)


def _assemble(unet, vae, text_encoder, tokenizer, scheduler):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def _build_builtin(info: ModelInfo):
    """Random weights from a fixed seed: the same weights on every call and machine."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from engine.tokenizer import load_clip_tokenizer

    if info.spec == "builtin:demo":  # trained, shipped weights (engine/demo_weights)
        from engine.demo_model import build_demo_pipeline

        return build_demo_pipeline()
    root = Path(info.location)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(BUILTIN_SEED)
        unet = UNet2DConditionModel.from_config(_read_json(root / "unet" / "config.json"))
        vae = AutoencoderKL.from_config(_read_json(root / "vae" / "config.json"))
        text_encoder = CLIPTextModel(CLIPTextConfig(**_read_json(root / "text_encoder" / "config.json")))
    scheduler = DDPMScheduler.from_config(_read_json(root / "scheduler" / "scheduler_config.json"))
    return _assemble(unet, vae, text_encoder, load_clip_tokenizer(), scheduler)


def _load_dir(info: ModelInfo):
    from diffusers import StableDiffusionPipeline

    try:
        return StableDiffusionPipeline.from_pretrained(
            info.location, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
            local_files_only=True,
        )
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load the pipeline in {info.location}: {str(exc).splitlines()[0]}") from None


def single_file_config_dir(family: str) -> Path:
    """Bundled JSON configs plus the derived tokenizer, as the folder from_single_file wants."""
    from engine.tokenizer import tokenizer_dir

    src = CONFIGS / ("sd21" if family == "sd2" else "sd15")
    dest = tokenizer_dir().parent / f"single-file-config-{src.name}"
    if not (dest / "tokenizer" / "vocab.json").exists():
        shutil.copytree(src, dest, dirs_exist_ok=True)
        shutil.copytree(tokenizer_dir(), dest / "tokenizer", dirs_exist_ok=True)
    return dest


def _load_single_file(info: ModelInfo):
    from diffusers import StableDiffusionPipeline

    config = single_file_config_dir(info.family)
    try:
        return StableDiffusionPipeline.from_single_file(
            info.location, config=str(config), local_files_only=True,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"cannot load checkpoint {info.location}: {str(exc).splitlines()[0]}") from None
