"""The CLIP judge of Table 1: which network it is, and how long it holds memory.

Which network.  OpenAI's CLIP weights were trained with QuickGELU (x * sigmoid(1.702 x)),
but open_clip's plain `ViT-B-32` config builds exact GELU and only warns when it is
given the `openai` weights; the scores then come from a network the weights were not
made for.  The rule here: **QuickGELU when the open_clip name says so (`ViT-B-32-quickgelu`),
when NAME:TAG's tag was trained with it (open_clip's own table: `openai` among others), or
when a --clip-weights folder's `open_clip_config.json` says so; GELU otherwise.**  A bare
checkpoint file cannot tell (OpenAI's and LAION's ViT-B/32 share every key and shape), so a
local copy of OpenAI's weights is named with its tag: `--clip ViT-B-32:openai --clip-weights PATH`
(or `--clip ViT-B-32-quickgelu`).  Every report records the activation the judge was built
with, read from the built network, and what decided it.

How long.  The judge is a second network beside the diffusion model (ViT-B/32: 0.6 GB in
fp32); it is on the device only while it embeds.  A job checks its judge before any work
(`prepare_judge`: the name, the tag, its weights fetched, the file fitting the network built
on the meta device), trains and generates everything it needs, then builds the judge
(`judge()`), embeds, and frees it.  Nothing keeps a judge between jobs: building ViT-B/32 costs
~1.5 s on one CPU thread (its random initialisation; reading the weights ~0.1 s), once per
job as before, small beside the images a Table 1 generates.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from engine.errors import UserError

BUILTIN_TINY = "builtin:tiny"
BUILTIN_DEMO = "builtin:demo"
TINY_SPECS = ("builtin:tiny", "builtin:sd2-tiny", "builtin:sdxl-tiny")

# A small CLIP with the real tokenizer (vocab 49408, context 77): random weights, seconds on a CPU.
TINY_CLIP = dict(
    embed_dim=32,
    vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=2, head_width=16),
    text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=4, layers=2),
)
OPEN_CLIP_CONFIG = "open_clip_config.json"  # what open_clip's hub folders say about their weights


# --- which judge ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class JudgeSpec:
    """A CLIP judge as asked for and checked, before anything is built."""

    name: str  # as given: builtin:tiny, ViT-B-32:openai, ViT-L-14 …
    arch: str  # the open_clip model name (the builtin's own name for a builtin)
    tag: str | None = None  # open_clip's pretrained tag (NAME:TAG)
    weights: Path | None = None  # a local checkpoint file (--clip-weights)
    quick_gelu: bool = False
    activation_from: str = ""  # what decided the activation, for the report
    preprocess: dict = field(default_factory=dict)  # image_mean/image_std the weights were trained with

    @property
    def builtin(self) -> bool:
        return self.arch in (BUILTIN_TINY, BUILTIN_DEMO)


def default_clip(model_spec: str | None) -> str:
    """The CLIP that fits the model: a built-in world's own CLIP, else OpenAI's ViT-B/32 (the TI paper's)."""
    from engine.sd.models import resolve_spec

    spec = resolve_spec(model_spec)
    if spec in TINY_SPECS:  # random-weight test models: a random CLIP measures them as well as any
        return BUILTIN_TINY
    if spec == BUILTIN_DEMO:
        return BUILTIN_DEMO
    return "ViT-B-32:openai"


def resolve_clip(name: str, weights: os.PathLike | str | None = None) -> JudgeSpec:
    """The judge `name` (+ --clip-weights) names, with its activation; refuses what cannot work.
    Reads no weights and builds nothing."""
    import open_clip

    path = _checkpoint_file(Path(weights).expanduser()) if weights is not None else None
    if name in (BUILTIN_TINY, BUILTIN_DEMO):
        if name == BUILTIN_DEMO and path is not None:
            raise UserError(f"{BUILTIN_DEMO} is the demo world's own CLIP; drop --clip-weights")
        return JudgeSpec(name, name, weights=path, activation_from="the built-in CLIP's config")
    if name.startswith("builtin:"):
        raise UserError(f"unknown built-in CLIP {name!r}; choose {BUILTIN_TINY} or {BUILTIN_DEMO}")
    arch, _, tag = name.partition(":")
    if arch not in open_clip.list_models():
        raise UserError(f"unknown CLIP model {arch!r}; use an open_clip name such as ViT-B-32 or ViT-L-14")
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if tag and tag not in tags:
        raise UserError(f"CLIP {arch} has no pretrained tag {tag!r}; known: {', '.join(tags[:8]) or 'none'}")
    if not tag and path is None:
        raise UserError(
            f"CLIP {name} needs its weights and nothing is downloaded here; pass --clip-weights PATH "
            f"(an open_clip checkpoint) or --clip {BUILTIN_TINY} for a smoke test"
        )
    quick, why = quick_gelu_for(arch, tag or None, path)
    return JudgeSpec(name, arch, tag or None, path, quick, why, _preprocess_for(arch, tag or None, path))


def quick_gelu_for(arch: str, tag: str | None = None, weights: Path | None = None) -> tuple[bool, str]:
    """Whether open_clip model `arch` must be built with QuickGELU for these weights, and what
    said so (the rule in this module's docstring)."""
    import open_clip

    if (open_clip.get_model_config(arch) or {}).get("quick_gelu"):
        return True, f"the {arch} config"
    if tag:
        trained = bool(open_clip.get_pretrained_cfg(arch, tag).get("quick_gelu"))
        return trained, f"the {tag} weights were trained with it"
    folder_says = _folder_config(weights).get("model_cfg", {}).get("quick_gelu")
    if folder_says is not None:
        return bool(folder_says), f"{OPEN_CLIP_CONFIG} beside the weights"
    return False, f"nothing says QuickGELU (for OpenAI's weights give --clip {arch}:openai)"


def _preprocess_for(arch: str, tag: str | None, weights: Path | None) -> dict:
    """The image normalisation the weights were trained with, when the tag or folder says it."""
    import open_clip

    if tag:
        cfg = open_clip.get_pretrained_cfg(arch, tag)
        return {f"image_{k}": tuple(cfg[k]) for k in ("mean", "std") if cfg.get(k)}
    cfg = _folder_config(weights).get("preprocess_cfg", {})
    return {f"image_{k}": tuple(cfg[k]) for k in ("mean", "std") if cfg.get(k)}


def _folder_config(weights: Path | None) -> dict:
    """open_clip_config.json from the weights' folder (a hub snapshot has one), or {}."""
    if weights is None:
        return {}
    try:
        config = json.loads((weights.parent / OPEN_CLIP_CONFIG).read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def _checkpoint_file(path: Path) -> Path:
    if path.is_dir():
        for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "model.safetensors",
                     "open_clip_pytorch_model.bin", "pytorch_model.bin"):
            if (path / name).is_file():
                return path / name
        raise UserError(f"{path} holds no open_clip checkpoint (open_clip_model.safetensors …); give the file")
    if not path.is_file():
        raise UserError(f"CLIP weights {path} not found; check --clip-weights")
    return path


def prepare_judge(name: str, weights: os.PathLike | str | None = None) -> JudgeSpec:
    """`resolve_clip`, then everything that could fail at load time, now, before a job generates
    or trains anything: a tag's weights fetched into the cache (once), the weights checked
    against the network (built on the meta device: no memory, no initialisation), the tokenizer."""
    spec = resolve_clip(name, weights)
    if spec.tag and spec.weights is None:
        spec = replace(spec, weights=_fetch_pretrained(spec))
    if spec.weights is not None:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "copying into a meta parameter is a no-op": the point
            network = _tiny_clip() if spec.arch == BUILTIN_TINY else build_network(spec, device="meta")[0]
            _load_weights(network, spec.name, spec.weights)
    if not spec.builtin:
        _tokenizer(spec.arch)
    return spec


def _fetch_pretrained(spec: JudgeSpec) -> Path:
    """The tag's weights file in open_clip's cache, downloaded there the first time."""
    import open_clip

    try:
        found = open_clip.download_pretrained(open_clip.get_pretrained_cfg(spec.arch, spec.tag))
        why = "nothing found"
    except Exception as exc:  # noqa: BLE001 - no network, not cached: all mean "not available"
        found, why = None, f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:120]}"
    if not found:
        raise UserError(f"CLIP {spec.name} could not be loaded ({why}); "
                        "pass --clip-weights PATH to a local open_clip checkpoint")
    return Path(found)


# --- building it -----------------------------------------------------------------------------------


@dataclass
class Clip:
    model: torch.nn.Module | None  # None once released
    preprocess: object  # PIL image -> [3, S, S] tensor
    tokenizer: object  # list[str] -> [N, 77] ids
    name: str
    weights: str | None
    device: torch.device
    activation: str = ""  # "QuickGELU" or "GELU", read from the network when it was built
    activation_from: str = ""

    @torch.no_grad()
    def images(self, images: list) -> torch.Tensor:
        """Unit-length image embeddings, [N, D] float32 on the CPU (PIL images or paths)."""
        out = []
        for start in range(0, len(images), 32):
            batch = torch.stack([self.preprocess(_rgb(im)) for im in images[start : start + 32]])
            out.append(self._model().encode_image(batch.to(self.device)).float())
        return torch.nn.functional.normalize(torch.cat(out), dim=-1).cpu()

    @torch.no_grad()
    def texts(self, texts: list[str]) -> torch.Tensor:
        """Unit-length text embeddings, [N, D] float32 on the CPU."""
        ids = self.tokenizer(list(texts)).to(self.device)
        return torch.nn.functional.normalize(self._model().encode_text(ids).float(), dim=-1).cpu()

    def describe(self) -> dict:
        """For reports: which judge, from which weights, with which activation (and what chose it)."""
        return {"name": self.name, "weights": self.weights, "activation": self.activation,
                "activation_from": self.activation_from}

    def _model(self) -> torch.nn.Module:
        if self.model is None:
            raise RuntimeError(f"CLIP {self.name} was released; load it again")
        return self.model


def activation(model: torch.nn.Module) -> str:
    """"QuickGELU" or "GELU": what the network's MLPs actually use."""
    from open_clip.transformer import QuickGELU

    return "QuickGELU" if any(isinstance(m, QuickGELU) for m in model.modules()) else "GELU"


def _rgb(image):
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as im:
            return im.convert("RGB")
    return image.convert("RGB")


def build_clip(spec: JudgeSpec, device="cpu") -> Clip:
    """The judge's network on `device`, with its preprocessing and tokenizer."""
    device = torch.device(device)
    if spec.arch == BUILTIN_TINY:
        import open_clip

        model, image_size = _tiny_clip(), TINY_CLIP["vision_cfg"]["image_size"]
        preprocess = open_clip.image_transform(image_size, is_train=False)
        tokenizer = open_clip.get_tokenizer("ViT-B-32")  # the real CLIP BPE, bundled with open_clip
    elif spec.arch == BUILTIN_DEMO:  # the demo world's own CLIP (engine/sd/demo_weights)
        from engine.sd.demo_model import load_demo_clip

        model, preprocess, tokenizer = load_demo_clip(device)
    else:
        model, preprocess = build_network(spec)
        tokenizer = _tokenizer(spec.arch)
    if spec.weights is not None:
        _load_weights(model, spec.name, spec.weights)
    model.to(device).eval().requires_grad_(False)
    weights = None if spec.weights is None else str(spec.weights)
    return Clip(model, preprocess, tokenizer, spec.name, weights, device, activation(model), spec.activation_from)


def load_clip(name: str = "ViT-B-32", weights: os.PathLike | str | None = None, device="cpu") -> Clip:
    """The judge `name` names, checked and built on `device` (outside a job: scripts, the demo)."""
    return build_clip(prepare_judge(name, weights), device)


def build_network(spec: JudgeSpec, device="cpu"):
    """open_clip's (model, preprocess) for `spec` with random weights and the activation the spec
    chose: the one place an open_clip judge is built (its weights come from spec.weights)."""
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(
        spec.arch, pretrained=None, force_quick_gelu=spec.quick_gelu, device=device, **spec.preprocess)
    return model, preprocess


def _tokenizer(arch: str):
    import open_clip

    try:
        return open_clip.get_tokenizer(arch)
    except Exception as exc:  # noqa: BLE001 - hub-backed tokenizers would need a download
        raise UserError(
            f"CLIP {arch}'s tokenizer is not available offline ({type(exc).__name__}); use a CLIP ViT model"
        ) from None


def _tiny_clip():
    from open_clip.model import CLIP

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the same random CLIP on every call and machine
        return CLIP(**TINY_CLIP)


def _read_state_dict(path: Path) -> dict:
    """safetensors, or a pickle opened with weights_only=True (a pickle can run code otherwise)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            data = load_file(str(path))
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a damaged or foreign file: say so, not why
        raise UserError(
            f"{path} could not be loaded safely as CLIP weights; give a .safetensors open_clip checkpoint"
        ) from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not data:
        raise UserError(f"{path} holds no state dict; give an open_clip checkpoint")
    return {k.removeprefix("module."): v for k, v in data.items()}


def _load_weights(model, name: str, path: Path) -> None:
    from open_clip import factory

    state = _read_state_dict(path)
    state = factory.convert_state_dict(model, state)  # third-party layouts -> open_clip's
    factory.resize_pos_embed(state, model)
    try:
        result = model.load_state_dict(state, strict=False)
        problem = f"{len(result.missing_keys)} missing, {len(result.unexpected_keys)} unexpected keys"
        ok = not result.missing_keys and not result.unexpected_keys
    except RuntimeError:  # shapes differ: weights of another architecture
        problem, ok = "tensor shapes differ", False
    if not ok:
        raise UserError(f"{path} does not fit CLIP {name} ({problem}); give weights made for {name}")


# --- its lifetime ----------------------------------------------------------------------------------


@contextlib.contextmanager
def judge(spec: JudgeSpec, device):
    """The judge on `device` for the block only: built on entry, released on exit (its memory
    back to the device's allocator and, on CUDA, to the driver)."""
    clip = build_clip(spec, device)
    try:
        yield clip
    finally:
        release(clip)


def release(clip: Clip) -> None:
    """Drop the judge's network (the Clip stays, unusable, for what it described)."""
    device, clip.model = clip.device, None
    if device.type == "cuda":
        torch.cuda.empty_cache()
