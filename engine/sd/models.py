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
                      (SD 2.x: 768 px v-prediction, or 512 px epsilon: see `sd2_prediction`)
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
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import NotSupportedError, UserError
from engine.settings.model import ModelOptions

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
# An SD 2.x config (768 px, v-prediction) -> its 512-px epsilon sibling, for a 2.x-base file.
# sd2-base holds stabilityai/stable-diffusion-2-1-base's values: sample_size 64, epsilon, and no
# attention upcast (only the 768-px v model needs it).  A config without a sibling (the tiny
# one) keeps its folder; the prediction type is then set on its scheduler (`_set_prediction`).
SD2_BASE_CONFIGS = {"sd21": "sd2-base"}
SD2_BASE_STEP = 875000  # the global_step of SD 2.0-base's .ckpt: diffusers' one sign of an epsilon 2.x file
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
    # How prediction_type was decided: "config" (the model's own scheduler config), "flag"
    # (--prediction-type or --model-resolution), "global_step" (an SD 2.x .ckpt's), "guess".
    prediction_source: str = "config"
    note: str = ""  # one line to show when the model loads (a guess the user should know about)
    config: str = ""  # the bundled config folder a single file is loaded with
    options: ModelOptions = ModelOptions()  # what qualified the spec (part of its identity)
    # The UNet's cross-attention layers a per-layer word (--per-layer, kohya XTI) has, by kohya's
    # keys (engine.sd.layers; SD 1.x/2.x: IN01 … OUT11); empty, with the reason, when unmappable.
    layers: tuple[str, ...] = ()
    layers_refused: str = ""

    def __post_init__(self):
        self.text_widths = tuple(self.text_widths) or (self.text_width,)

    @property
    def family_label(self) -> str:
        from engine.sd.family import FAMILY_LABELS

        return FAMILY_LABELS.get(self.family, self.family)

    def require_layers(self, what: str = "--per-layer") -> tuple[str, ...]:
        """The layer keys, or a one-line UserError saying why this model has none."""
        if not self.layers:
            fix = "train it without --per-layer" if what == "--per-layer" else "leave per-layer out of the methods"
            raise UserError(f"{what}: {self.spec} ({self.family_label}) cannot take per-layer words: "
                            f"{self.layers_refused or 'its UNet has no cross-attention layer'}; {fix}")
        return self.layers

    def identity(self) -> dict:
        return {
            "spec": self.spec,
            "kind": self.kind,
            "family": self.family,
            "text_width": self.text_width,
            "text_widths": list(self.text_widths),
            "prediction_type": self.prediction_type,
            "prediction_source": self.prediction_source,
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


def resolve_options(spec: str | None, options: ModelOptions | None) -> ModelOptions:
    """The qualifiers of a spec: the ones given, else, for the spec from the environment
    ($TISTUDIO_MODEL, `spec` None), the environment's.  An explicit spec never takes the
    environment's: the qualifiers travel with the spec they qualify (engine.settings.model)."""
    if options is not None and (options.prediction_type or options.resolution):
        return options
    return ModelOptions.from_env() if spec is None else ModelOptions()


def model_info(spec: str | None = None, options: ModelOptions | None = None) -> ModelInfo:
    """What `spec` is, qualified by `options` (--prediction-type, --model-resolution)."""
    options = resolve_options(spec, options)
    info = _spec_info(resolve_spec(spec), options)
    return _qualified(info, options)


def _spec_info(spec: str, options: ModelOptions) -> ModelInfo:
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
        return _single_file_info(spec, path, options)
    if path.suffix in (".safetensors", ".ckpt") or spec.startswith((".", "/", "~")):
        raise UserError(f"model file {spec} not found; check the path given to --model")
    if spec.count("/") == 1:
        return _info_from_config_dir(spec, "hub", _hub_snapshot(spec))
    raise UserError(
        f"model {spec!r} not understood; give builtin:tiny, a diffusers folder, a .safetensors/.ckpt file or a hub id"
    )


def _qualified(info: ModelInfo, options: ModelOptions) -> ModelInfo:
    """`info` with the user's qualifiers laid over what the configs say (any kind of spec: a
    diffusers folder whose scheduler config is wrong is fixed the same way)."""
    info.options = options
    if options.prediction_type and options.prediction_type != info.prediction_type:
        info.prediction_type, info.prediction_source, info.note = options.prediction_type, "flag", ""
    if options.resolution:
        info.resolution = options.resolution
    return info


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
    layers, refused = _cross_layers(family, unet)
    return ModelInfo(
        spec=spec,
        kind=kind,
        family=family,
        text_width=widths[0],
        text_widths=widths,
        prediction_type=sched.get("prediction_type", "epsilon"),
        resolution=int(unet.get("sample_size", 64)) * scale,
        location=str(root),
        layers=layers,
        layers_refused=refused,
    )


def _cross_layers(family_name: str, unet: dict) -> tuple[tuple[str, ...], str]:
    """The UNet's per-layer keys as its family maps them, or () and why not."""
    from engine.sd.family import family

    try:
        return tuple(layer.key for layer in family(family_name).cross_layers(unet)), ""
    except UserError as exc:
        return (), str(exc)


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


# What a pipeline load reads from a hub repo: model_index.json and these folders (no safety
# checker, no feature extractor: we pass None for both).  Everything else in a repo (the root
# single-file checkpoints, fp16 variants, .bin twins of .safetensors files, onnx, openvino,
# flax, a second VAE) is left on the hub: SDXL base is ~7 GB of fp32 safetensors, not ~37 GB.
HUB_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
HUB_CONFIG_ENDINGS = (".json", ".txt", ".model")  # configs and tokenizer files
# diffusers' own names for a component's (non-variant) weights, whole or sharded, and the shard index.
_HUB_WEIGHTS = re.compile(r"^(diffusion_pytorch_model|model|pytorch_model)(-\d{5}-of-\d{5})?\.(safetensors|bin)$")
_HUB_INDEX = re.compile(r"^(diffusion_pytorch_model|model|pytorch_model)\.(safetensors|bin)\.index\.json$")


def hub_files(files: list[str], weights: bool = False) -> list[str]:
    """The files of a hub repo (its listing, `files`) that loading it as a diffusers pipeline
    needs: configs and tokenizers, and with `weights` each component's weights in one format,
    .safetensors, or .bin for a component that has no .safetensors (as diffusers picks them)."""
    chosen = [f for f in files if f == "model_index.json"]
    by_part: dict[str, list[str]] = {}
    for path in files:
        part, _, name = path.partition("/")
        if part in HUB_PARTS and name and "/" not in name:
            by_part.setdefault(part, []).append(name)
    for part, names in by_part.items():
        chosen += [f"{part}/{n}" for n in names if n.endswith(HUB_CONFIG_ENDINGS) and ".index." not in n]
        if weights:
            chosen += [f"{part}/{n}" for n in _weights_in_one_format(names)]
    return chosen


def _weights_in_one_format(names: list[str]) -> list[str]:
    for ext in ("safetensors", "bin"):
        found = [n for n in names if (_HUB_WEIGHTS.match(n) or _HUB_INDEX.match(n)) and f".{ext}" in n]
        if any(_HUB_WEIGHTS.match(n) for n in found):
            return found
    return []


def _hub_snapshot(repo_id: str, weights: bool = False) -> Path:
    """The local snapshot of a hub model: its configs only (the CLI, the studio), or with weights
    (the worker).  Online, the repo's listing decides what to fetch (`hub_files`); offline
    (HF_HUB_OFFLINE=1) the cached snapshot is used as it is."""
    from huggingface_hub import HfApi, snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    try:
        if offline:
            path = snapshot_download(repo_id, local_files_only=True)
        else:
            path = snapshot_download(repo_id, allow_patterns=hub_files(HfApi().list_repo_files(repo_id), weights))
    except Exception as exc:  # noqa: BLE001 - hub errors are many; all mean "not available here"
        hint = "it is not in the local Hugging Face cache" if offline else f"{type(exc).__name__}"
        raise UserError(f"model {repo_id!r} could not be resolved ({hint}); "
                        "download it first or give a local path") from None
    return Path(path)


def _single_file_shapes(path: Path) -> tuple[dict[str, tuple[int, ...]], int | None]:
    """Every tensor's name and shape, without reading the weights, and the file's training
    step (a .ckpt's top-level `global_step`; a .safetensors file's metadata, rarely there)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
                step = (fh.metadata() or {}).get("global_step")
        except Exception:  # noqa: BLE001 - any failure means the file is not a checkpoint we can read
            raise UserError(f"{path} is not a readable .safetensors checkpoint; is the file complete?") from None
        return shapes, _step(step)
    if path.suffix == ".ckpt":
        import torch

        try:
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # noqa: BLE001 - any failure means it cannot be loaded safely
            raise UserError(f"{path} could not be loaded safely (weights_only); convert it to .safetensors") from None
        data = data if isinstance(data, dict) else {}
        step = data.get("global_step")
        data = data.get("state_dict", data)
        return {k: tuple(v.shape) for k, v in data.items() if hasattr(v, "shape")}, _step(step)
    raise UserError(f"{path}: unknown checkpoint type; use a .safetensors or .ckpt file")


def _step(value) -> int | None:
    """A global_step as stored (an int, a 0-d tensor, or text in safetensors metadata), or None."""
    try:
        return int(value.item() if hasattr(value, "item") else value)
    except (TypeError, ValueError, RuntimeError):
        return None


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


def _single_file_info(spec: str, path: Path, options: ModelOptions) -> ModelInfo:
    shapes, step = _single_file_shapes(path)
    family = family_from_keys(shapes)
    width = (shapes.get(SINGLE_FILE_TEXT_KEY[family]) or (0, 0))[-1]
    folder = SINGLE_FILE_CONFIGS.get((family, width))
    if folder is None:
        raise UserError(f"{path}: a {family} checkpoint with text width {width}, which no bundled config fits; "
                        "convert it to a diffusers folder and pass that folder")
    prediction, source = sd2_prediction(step, options) if family == "sd2" else (None, "config")
    if prediction == "epsilon":
        folder = SD2_BASE_CONFIGS.get(folder, folder)
    info = _info_from_config_dir(spec, "single_file", CONFIGS / folder, family)
    info.location, info.config = str(path), folder
    if prediction:
        info.prediction_type, info.prediction_source = prediction, source
    if source == "guess":
        found = "no global_step" if step is None else f"global_step {step}, not 2.0-base's {SD2_BASE_STEP}"
        info.note = (f"{path.name}: an SD 2.x file whose weights do not say how it predicts ({found}); "
                     f"taken as v-prediction at {info.resolution} px. For a 2.x-base (512 px) file pass "
                     "--prediction-type epsilon; --prediction-type v_prediction silences this")
    return info


def sd2_prediction(global_step: int | None, options: ModelOptions) -> tuple[str, str]:
    """(prediction type, how it was decided) for an SD 2.x single file.  The user's flags first
    (--model-resolution 512 or 768 also says which model it is); else diffusers' own rule: epsilon
    only for SD 2.0-base's global_step, v-prediction otherwise (a guess: 2.1-base files and most
    fine-tunes carry no such step, and .safetensors files none at all)."""
    if options.prediction_type:
        return options.prediction_type, "flag"
    if options.resolution in (512, 768):
        return ("epsilon" if options.resolution == 512 else "v_prediction"), "flag"
    if global_step == SD2_BASE_STEP:
        return "epsilon", "global_step"
    return "v_prediction", "guess"


def fingerprint(info: ModelInfo) -> str:
    """A short identity for metadata: config hash for built-ins, file sizes/mtimes otherwise."""
    h = hashlib.sha256(f"{info.kind}|{info.spec}|{BUILTIN_SEED}".encode())
    if info.options.prediction_type or info.options.resolution:  # a qualified spec is another model
        h.update(f"|{info.options.prediction_type}|{info.options.resolution}".encode())
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
    info = model_info(spec, ModelOptions())  # the qualifiers change no tokenizer
    if info.kind in ("builtin", "single_file"):
        from engine.sd.family import family

        return family(info.family).derived_tokenizers()[0]
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(info.location, subfolder="tokenizer")


def load_model(spec: str | None = None, device="cpu", dtype=None, options: ModelOptions | None = None) -> LoadedModel:
    """The model `spec` names, qualified by `options` (see model_info), on `device` in `dtype`."""
    import torch

    from engine.sd.family import pool_at_eos

    dtype = dtype or torch.float32
    info = model_info(spec, options)
    loader = {"builtin": _build_builtin, "diffusers": _load_dir, "hub": _load_dir, "single_file": _load_single_file}
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # its dtype-cast notices are noise for our users
    diffusers_logging.disable_progress_bar()  # "Loading pipeline components" bars, likewise
    if info.kind == "hub":  # reading the spec fetched configs only; the weights come now, in the worker
        _hub_snapshot(info.spec, weights=True)
    pipe = loader[info.kind](info)
    _set_prediction(pipe, info.prediction_type)
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


def _set_prediction(pipe, prediction_type: str) -> None:
    """Make the pipeline's scheduler predict what the model was decided to (a flag, or an SD 2.x
    file's sibling config missing); training's target and sampling both read it from there."""
    if pipe.scheduler.config.get("prediction_type") != prediction_type:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type=prediction_type)


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
    family = info.family
    config = single_file_config_dir(info.config, family)
    try:
        return _pipeline_class(family).from_single_file(
            info.location, config=str(config), local_files_only=True, **_pipeline_kwargs(family)
        )
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"cannot load checkpoint {info.location}: {str(exc).splitlines()[0]}") from None
