"""Model specs -> Stable Diffusion components.

A spec is one of:
  builtin:tiny        SD-shaped, random weights from a fixed seed, 64 px; seconds on a CPU
  builtin:demo        a miniature SD trained by this project on its own procedural world (demo/)
  builtin:sd15-arch   SD 1.5's real shapes with random weights (benchmarks, memory checks)
  builtin:sd21-arch   SD 2.1's real shapes (768 px, v-prediction) with random weights
  builtin:sd2-tiny    SD 2.x-shaped (v-prediction, '!' padding), tiny, random weights
  builtin:sdxl-tiny   SDXL-shaped (two text encoders, add_time_ids), tiny, random weights; seconds on a CPU
  builtin:sdxl-arch   SDXL base 1.0's real shapes (1024 px) with random weights (benchmarks)
  DIR                 a diffusers folder (model_index.json), as written by save_pretrained
  FILE.safetensors / FILE.ckpt   a single SD 1.x/2.x/SDXL checkpoint, loaded offline from bundled configs
  owner/name          a hub id, from the local Hugging Face cache (HF_HUB_OFFLINE=1 works)

Everything is returned as a diffusers pipeline (`StableDiffusionPipeline` with
the safety checker off, or `StableDiffusionXLPipeline` without watermark)
wrapped in `LoadedModel`, so training, generation and parity tests all share
the exact components diffusers itself would use.  What differs between the
families (encoders, conditioning, file layouts) lives in engine.sd.family.

torch is imported inside the functions that load weights: the studio reads
specs, widths and tokenizers from here without paying for torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import NotSupportedError, UserError

CONFIGS = Path(__file__).parent / "configs"
# spec -> (bundled config folder, family)
BUILTIN_SPECS = {
    "builtin:tiny": ("tiny", "sd1"),
    "builtin:demo": ("demo", "sd1"),
    "builtin:sd15-arch": ("sd15", "sd1"),
    "builtin:sd21-arch": ("sd21", "sd2"),
    "builtin:sd2-tiny": ("sd2-tiny", "sd2"),
    "builtin:sdxl-tiny": ("sdxl-tiny", "sdxl"),
    "builtin:sdxl-arch": ("sdxl", "sdxl"),
}
BUILTINS = {spec: folder for spec, (folder, _) in BUILTIN_SPECS.items()}
BUILTIN_SEED = 0
DEFAULT_SPEC = "builtin:demo"  # trained weights: the default that means something
SUPPORTED = "SD 1.x, SD 2.x and SDXL base models are"
# Bundled configs a single-file checkpoint may fit: (family, text width) -> folder.
SINGLE_FILE_CONFIGS = {("sd1", 768): "sd15", ("sd1", 32): "tiny", ("sd2", 1024): "sd21", ("sd2", 32): "sd2-tiny",
                       ("sdxl", 768): "sdxl", ("sdxl", 32): "sdxl-tiny"}
# The token-embedding key of encoder 1 in each family's original (single-file) layout.
SINGLE_FILE_TEXT_KEY = {
    "sd1": "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
    "sd2": "cond_stage_model.model.token_embedding.weight",
    "sdxl": "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
}


@dataclass
class ModelInfo:
    """What a spec is, read from configs alone (no weights): cheap enough for the CLI."""

    spec: str
    kind: str  # builtin | diffusers | single_file | hub
    family: str  # sd1 | sd2 | sdxl (engine.sd.family)
    text_width: int  # encoder 1's width (the only encoder of SD 1.x/2.x)
    prediction_type: str  # epsilon | v_prediction
    resolution: int
    location: str = ""
    text_widths: tuple[int, ...] = ()  # every text encoder's width, in pipeline order (SDXL: 768, 1280)

    def __post_init__(self):
        self.text_widths = tuple(self.text_widths) or (self.text_width,)

    @property
    def family_label(self) -> str:
        from engine.sd.family import FAMILY_LABELS

        return FAMILY_LABELS.get(self.family, self.family)

    def identity(self) -> dict:
        return {
            "spec": self.spec,
            "kind": self.kind,
            "family": self.family,
            "text_width": self.text_width,
            "text_widths": list(self.text_widths),
            "prediction_type": self.prediction_type,
            "resolution": self.resolution,
            "fingerprint": fingerprint(self),
        }


@dataclass
class LoadedModel:
    info: ModelInfo
    pipe: Any  # diffusers.StableDiffusionPipeline or StableDiffusionXLPipeline
    device: Any  # torch.device
    dtype: Any  # torch.dtype

    tokenizer = property(lambda self: self.pipe.tokenizer)
    text_encoder = property(lambda self: self.pipe.text_encoder)
    unet = property(lambda self: self.pipe.unet)
    vae = property(lambda self: self.pipe.vae)

    @property
    def family(self):
        """The engine.sd.family object: how this model's prompts become conditioning."""
        from engine.sd.family import family

        return family(self.info.family)

    @property
    def encoders(self) -> list:
        """(text_encoder, tokenizer) pairs that take placeholder rows, in pipeline order."""
        return self.family.encoders(self.pipe)

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
        if spec not in BUILTIN_SPECS:
            raise UserError(f"unknown built-in model {spec!r}; choose one of {', '.join(BUILTIN_SPECS)}")
        folder, family = BUILTIN_SPECS[spec]
        return _info_from_config_dir(spec, "builtin", CONFIGS / folder, family)
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


def _read_json(path: Path, what: str = "the model") -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path}: {exc}; is {what} folder complete?") from None


def _component(index: dict, name: str) -> str | None:
    """The class a model_index.json names for a component (None when absent or null)."""
    entry = index.get(name)
    return entry[1] if isinstance(entry, list) and len(entry) == 2 and entry[1] else None


def pipeline_family(index: dict, unet: dict | None = None) -> str:
    """sdxl, or sd (1.x/2.x, told apart by the text encoder); refuse refiners and other families."""
    name = str(index.get("_class_name", ""))
    xl = "StableDiffusionXL" in name or (unet or {}).get("addition_embed_type") == "text_time"
    if xl and (not _component(index, "text_encoder") or index.get("requires_aesthetics_score")):
        raise NotSupportedError(
            "this is an SDXL refiner (one OpenCLIP encoder, aesthetic score); refiners are not supported, "
            "use an SDXL base model"
        )
    if xl:
        return "sdxl"
    if name and (not name.startswith("StableDiffusion") or name.startswith("StableDiffusion3")):
        raise NotSupportedError(f"{name} models are not supported; {SUPPORTED}")
    return "sd"


def _info_from_config_dir(spec: str, kind: str, root: Path, family: str | None = None) -> ModelInfo:
    index = _read_json(root / "model_index.json")
    unet_path = root / "unet" / "config.json"
    unet = json.loads(unet_path.read_text()) if unet_path.is_file() else None
    kind_of = pipeline_family(index, unet)
    what = "the SDXL model" if kind_of == "sdxl" else "the model"
    unet = _read_json(unet_path, what)
    texts = [_read_json(root / "text_encoder" / "config.json", what)]
    if kind_of == "sdxl":
        texts.append(_read_json(root / "text_encoder_2" / "config.json", what))
    sched = _read_json(root / "scheduler" / "scheduler_config.json", what)
    vae = _read_json(root / "vae" / "config.json", what)
    widths = tuple(int(t["hidden_size"]) for t in texts)
    if kind_of == "sdxl":
        family = "sdxl"
        if unet.get("cross_attention_dim") != sum(widths):
            raise NotSupportedError(f"{spec}: its UNet does not read both text encoders as SDXL's does; {SUPPORTED}")
    else:
        if unet.get("addition_embed_type") or unet.get("cross_attention_dim") != widths[0]:
            raise NotSupportedError(f"{spec} is not an SD 1.x/2.x or SDXL pipeline; {SUPPORTED}")
        family = family or ("sd2" if widths[0] == 1024 or _pads_with_bang(root) else "sd1")
    scale = 2 ** (len(vae.get("block_out_channels", [0])) - 1)
    return ModelInfo(
        spec=spec,
        kind=kind,
        family=family,
        text_width=widths[0],
        text_widths=widths,
        prediction_type=sched.get("prediction_type", "epsilon"),
        resolution=int(unet.get("sample_size", 64)) * scale,
        location=str(root),
    )


def _pads_with_bang(root: Path) -> bool:
    """SD 2.x's tokenizer pads with '!' (OpenCLIP's way); SD 1.x's with <|endoftext|>."""
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = root / "tokenizer" / name
        if path.is_file():
            with contextlib.suppress(OSError, ValueError):
                pad = json.loads(path.read_text()).get("pad_token")
                pad = pad.get("content") if isinstance(pad, dict) else pad
                return pad == "!"
    return False


HUB_CONFIGS = ["*.json", "*.txt"]  # what reading a spec needs: configs and tokenizer files
HUB_WEIGHTS = ["*.safetensors", "*.bin"]  # fetched by the worker, which loads them


def _hub_snapshot(repo_id: str, weights: bool = False) -> Path:
    """The local snapshot of a hub model: its configs only (the CLI, the studio), or with weights (the worker)."""
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    try:
        path = snapshot_download(
            repo_id,
            local_files_only=offline,
            allow_patterns=HUB_CONFIGS + (HUB_WEIGHTS if weights else []),
            ignore_patterns=["*ema*", "*.ckpt", "*fp32*", "safety_checker/*", "*.msgpack", "*.onnx"],
        )
    except Exception as exc:  # noqa: BLE001 - hub errors are many; all mean "not available here"
        hint = "it is not in the local Hugging Face cache" if offline else f"{type(exc).__name__}"
        raise UserError(f"model {repo_id!r} could not be resolved ({hint}); "
                        "download it first or give a local path") from None
    return Path(path)


def _single_file_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's name and shape, without reading the weights."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
        except Exception:  # noqa: BLE001 - any failure means the file is not a checkpoint we can read
            raise UserError(f"{path} is not a readable .safetensors checkpoint; is the file complete?") from None
    if path.suffix == ".ckpt":
        import torch

        try:
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # noqa: BLE001 - any failure means it cannot be loaded safely
            raise UserError(f"{path} could not be loaded safely (weights_only); convert it to .safetensors") from None
        data = data.get("state_dict", data) if isinstance(data, dict) else {}
        return {k: tuple(v.shape) for k, v in data.items() if hasattr(v, "shape")}
    raise UserError(f"{path}: unknown checkpoint type; use a .safetensors or .ckpt file")


def family_from_keys(keys) -> str:
    """Tell SD 1.x, SD 2.x and SDXL apart by the checkpoint's text-encoder keys; refuse the rest."""
    keys = list(keys)

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if has("conditioner.embedders.0.transformer.") and has("conditioner.embedders.1.model."):
        return "sdxl"
    if has("conditioner.embedders.0.model."):
        raise NotSupportedError("this checkpoint is an SDXL refiner; refiners are not supported, "
                                "use an SDXL base model")
    if has("conditioner.embedders"):
        raise NotSupportedError(f"this checkpoint's text encoders are not SDXL base's; {SUPPORTED} supported")
    if has("text_encoders.") or has("double_blocks.") or has("model.diffusion_model.joint_blocks."):
        raise NotSupportedError(f"this checkpoint is an SD3/Flux-family model; {SUPPORTED} supported")
    if has("cond_stage_model.model."):
        return "sd2"
    if has("cond_stage_model.transformer."):
        return "sd1"
    raise NotSupportedError(f"this checkpoint is not a Stable Diffusion model; {SUPPORTED} supported")


def _single_file_info(spec: str, path: Path) -> ModelInfo:
    shapes = _single_file_shapes(path)
    family = family_from_keys(shapes)
    width = (shapes.get(SINGLE_FILE_TEXT_KEY[family]) or (0, 0))[-1]
    folder = SINGLE_FILE_CONFIGS.get((family, width))
    if folder is None:
        raise UserError(f"{path}: a {family} checkpoint with text width {width}, which no bundled config fits; "
                        "convert it to a diffusers folder and pass that folder")
    info = _info_from_config_dir(spec, "single_file", CONFIGS / folder, family)
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
    """The model's (first) tokenizer alone (cheap: no weights)."""
    info = model_info(spec)
    if info.kind in ("builtin", "single_file"):
        from engine.sd.family import family

        return family(info.family).derived_tokenizers()[0]
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(info.location, subfolder="tokenizer")


def load_model(spec: str | None = None, device="cpu", dtype=None) -> LoadedModel:
    import torch

    from engine.sd.family import pool_at_eos

    dtype = dtype or torch.float32
    info = model_info(spec)
    loader = {"builtin": _build_builtin, "diffusers": _load_dir, "hub": _load_dir, "single_file": _load_single_file}
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # its dtype-cast notices are noise for our users
    diffusers_logging.disable_progress_bar()  # "Loading pipeline components" bars, likewise
    if info.kind == "hub":  # reading the spec fetched configs only; the weights come now, in the worker
        _hub_snapshot(info.spec, weights=True)
    pipe = loader[info.kind](info)
    pipe.set_progress_bar_config(disable=True)
    device = torch.device(device)
    pipe.to(device=device, dtype=dtype)
    model = LoadedModel(info=info, pipe=pipe, device=device, dtype=dtype)
    for module in (pipe.unet, pipe.vae, *(encoder for encoder, _ in model.encoders)):
        module.requires_grad_(False)
        module.eval()
    for encoder, tokenizer in model.encoders:
        pool_at_eos(encoder, tokenizer)
    return model


def _pipeline_class(family: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline


def _pipeline_kwargs(family: str) -> dict:
    """What we pass every pipeline we build: no safety checker (SD), no watermark (SDXL)."""
    if family == "sdxl":
        return {"add_watermarker": False}
    return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}


def _build_builtin(info: ModelInfo):
    """Random weights from a fixed seed: the same weights on every call and machine."""
    import diffusers
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from engine.sd.family import family

    if info.spec == "builtin:demo":  # trained, shipped weights (engine/sd/demo_weights)
        from engine.sd.demo_model import build_demo_pipeline

        return build_demo_pipeline()
    root = Path(info.location)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(BUILTIN_SEED)
        parts = {
            "unet": UNet2DConditionModel.from_config(_read_json(root / "unet" / "config.json")),
            "vae": AutoencoderKL.from_config(_read_json(root / "vae" / "config.json")),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**_read_json(root / "text_encoder" / "config.json"))),
        }
        if info.family == "sdxl":
            config = CLIPTextConfig(**_read_json(root / "text_encoder_2" / "config.json"))
            parts["text_encoder_2"] = CLIPTextModelWithProjection(config)
    tokenizers = family(info.family).derived_tokenizers()
    parts["tokenizer"] = tokenizers[0]
    if info.family == "sdxl":
        parts["tokenizer_2"] = tokenizers[1]
    sched_config = _read_json(root / "scheduler" / "scheduler_config.json")
    parts["scheduler"] = getattr(diffusers, sched_config["_class_name"]).from_config(sched_config)
    return _pipeline_class(info.family)(**parts, **_pipeline_kwargs(info.family))


def _load_dir(info: ModelInfo):
    try:
        return _pipeline_class(info.family).from_pretrained(
            info.location, local_files_only=True, **_pipeline_kwargs(info.family)
        )
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load the pipeline in {info.location}: {str(exc).splitlines()[0]}") from None


def single_file_config_dir(folder: str, family_name: str) -> Path:
    """Bundled JSON configs plus the derived tokenizer(s), as the folder from_single_file wants."""
    from engine.sd.family import family
    from engine.sd.tokenizer import tokenizer_dir

    src = CONFIGS / folder
    dest = tokenizer_dir().parent / f"single-file-config-v2-{folder}"
    names = ["tokenizer", "tokenizer_2"][: len(family(family_name).tokenizer_pads)]
    if not all((dest / name / "vocab.json").exists() for name in names):
        shutil.copytree(src, dest, dirs_exist_ok=True)
        for name, pad in zip(names, family(family_name).tokenizer_pads):
            shutil.copytree(tokenizer_dir(pad), dest / name, dirs_exist_ok=True)
    return dest


def _load_single_file(info: ModelInfo):
    family = family_from_keys(_single_file_shapes(Path(info.location)))
    width = info.text_width
    config = single_file_config_dir(SINGLE_FILE_CONFIGS[(family, width)], family)
    try:
        return _pipeline_class(family).from_single_file(
            info.location, config=str(config), local_files_only=True, **_pipeline_kwargs(family)
        )
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"cannot load checkpoint {info.location}: {str(exc).splitlines()[0]}") from None
