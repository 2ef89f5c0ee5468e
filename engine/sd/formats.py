"""Textual Inversion embedding files: read every common layout, write what each tool loads.

Embeddings come from many trainers, each with its own dict layout, and often
as pickles, which can run arbitrary code when loaded naively.  This module is
the one place that turns a file into validated float32 ``[n, dim]`` blocks
(one per text encoder: SDXL has two), and blocks back into files that
diffusers, A1111, kohya and ComfyUI load.

Layouts recognised on read (by their keys):

* diffusers       ``{token: [n, dim]}`` (old files: ``[dim]``), .safetensors or .bin;
                  SDXL: two such files, ``learned_embeds.safetensors`` (768) and
                  ``learned_embeds_2.safetensors`` (1280), given as either file or their folder
* a1111           ``{"string_to_param": {"*": [n, dim]}, "name": ..., "step": ...}``
                  as .pt, or the same dict in an A1111 PNG card: its ``sd-ti-embedding`` text
                  chunk, else the copy hidden in its pixels (engine.sd.png_card)
* textual_inversion  the original repo: like a1111 but with no ``name``
* kohya           ``{"emb_params": [n, dim]}`` (also invoke-training)
* onetrainer      ``{"emp_params": [n, dim]}`` (sic), optionally ``emp_params_out`` (ignored)
* sdxl            ``{"clip_l": [n, 768], "clip_g": [n, 1280]}`` (kohya, A1111, ComfyUI;
                  OneTrainer adds ``clip_l_out``/``clip_g_out``, ignored)

* kohya-xti       kohya's XTI (P+) per-layer word: ``{"IN01": [n, dim], …, "OUT11": [n, dim]}``, one
                  vector set per UNet cross-attention layer (engine.sd.layers; SD 1.x/2.x: 16)

A per-layer word is kept as one [L*n, dim] block, layer-major (kohya's own concatenation),
with `Embedding.layers` naming the layers; it fits only a model whose UNet has those layers,
and only kohya-xti holds it (diffusers and A1111 files have no place for layers).  SD3/Flux
embeddings (``t5``) are recognised only to be refused with a clear message.  The widths say
the family: 768 is SD 1.x, 1024 SD 2.x, 768 + 1280 SDXL (engine.sd.family).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import pickle
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import safetensors
import safetensors.torch
import torch

from engine.errors import NotSupportedError, UserError
from engine.sd.family import describe_widths, family_of_widths
from engine.sd.layers import describe_layers, is_layer_key, layer_order
from engine.sd.png_card import A1111_TOKEN_ID, find_hidden  # A1111's "*" id: written, ignored on load
from engine.sd.png_card import CHUNK as PNG_CHUNK
from engine.store.paths import atomic_path

FORMATS_READ = ("diffusers", "a1111", "kohya", "onetrainer", "textual_inversion", "sdxl", "kohya-xti")
FORMATS_WRITE = ("diffusers", "a1111", "kohya", "comfy", "kohya-xti")
PER_LAYER_FORMAT = "kohya-xti"  # the one layout that holds a per-layer word
SDXL_KEYS = ("clip_l", "clip_g")  # encoder 1 (CLIP ViT-L, 768), encoder 2 (OpenCLIP bigG, 1280)
DIFFUSERS_SDXL_FILES = ("learned_embeds.safetensors", "learned_embeds_2.safetensors")

# CLIP's context is 77 tokens including BOS/EOS, so a prompt can never hold
# more than 75 vectors of one embedding; anything bigger is not an embedding.
MAX_VECTORS = 75
MAX_WIDTH = 4096
# The largest legal embedding is 75 x 4096 x fp64 = 2.4 MB; 64 MiB leaves room
# for pickle overhead while refusing model checkpoints before loading them.
MAX_FILE_BYTES = 64 * 1024 * 1024

_SUPPORTED = (
    "supported: diffusers ({token: tensor}; SDXL: learned_embeds + learned_embeds_2), A1111 .pt/.png, "
    "kohya/invoke-training (emb_params), OneTrainer (emp_params), SDXL clip_l + clip_g, original "
    "textual_inversion .pt"
)
_PICKLE_SUFFIXES = (".bin", ".pt", ".ckpt")
_WRITE_SUFFIXES = {"diffusers": (".safetensors", ".bin"), "a1111": (".pt",), "kohya": (".safetensors",),
                   "comfy": (".safetensors",), "kohya-xti": (".safetensors",)}
# SDXL's two blocks fit no .pt layout: every tool reads them from clip_l/clip_g safetensors.
_WRITE_SUFFIXES_SDXL = {"diffusers": (".safetensors", ".bin"), "a1111": (".safetensors",),
                        "kohya": (".safetensors",), "comfy": (".safetensors",)}
_KNOWN_SUFFIXES = {".safetensors", ".png", *_PICKLE_SUFFIXES}
_MULTI_ENCODER_KEYS = {"clip_l", "clip_g", "t5"}
_SIMPLE_TYPES = (str, int, float, bool, type(None))
# torch's safe_globals() edits a process-wide allowlist and removes on exit, so
# two overlapping loads could strip each other's entry: serialise our loads.
_TORCH_LOAD_LOCK = threading.Lock()


@dataclass
class Embedding:
    """A validated embedding: float32 ``[n, dim]`` blocks, one per text encoder, plus what the file said."""

    vectors: torch.Tensor  # encoder 1's block: float32, [n, dim], contiguous, CPU, owns its storage
    token: str | None  # token/name stored in the file (diffusers key, A1111 "name")
    format: str  # one of FORMATS_READ
    step: int | None = None
    meta: dict = field(default_factory=dict)  # "path", file metadata, A1111 extras, "ignored" keys
    vectors_2: torch.Tensor | None = None  # SDXL: encoder 2's (clip_g) block, [n, 1280]
    layers: tuple[str, ...] = ()  # a per-layer word's layers (vectors is then [L*n, dim], layer-major)

    @property
    def blocks(self) -> tuple[torch.Tensor, ...]:
        """One [n, width] block per text encoder, in pipeline order."""
        return (self.vectors,) if self.vectors_2 is None else (self.vectors, self.vectors_2)

    @property
    def width(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(int(b.shape[1]) for b in self.blocks)

    @property
    def num_vectors(self) -> int:
        """Vectors per encoder (a per-layer word: per layer)."""
        return int(self.vectors.shape[0]) // max(1, len(self.layers))

    @property
    def family(self) -> str | None:
        """sd1 / sd2 / sdxl by the widths; None for widths no released model has."""
        return family_of_widths(self.widths)


# --------------------------------------------------------------------------- read


def read_embedding(path: os.PathLike | str) -> Embedding:
    """Load and validate an embedding file; every problem is a one-line UserError.

    diffusers' SDXL pair is read from its folder, or from either of its two files."""
    path = Path(path)
    if path.is_dir():
        return _read_diffusers_pair(*_pair_in_folder(path))
    emb = _read_one(path)
    partner = _diffusers_partner(path, emb)
    if partner is not None:
        first, second = sorted((path, partner), key=lambda p: p.stem.endswith("_2"))
        try:
            return _read_diffusers_pair(first, second)
        except UserError:
            return emb  # a neighbour with a similar name, not this word's other half
    return emb


def _read_one(path: Path) -> Embedding:
    _check_file(path)
    data, file_meta = _load(path)
    fmt, tensors, token, step, meta = _parse_layout(data, path)
    if fmt == PER_LAYER_FORMAT:
        return _per_layer_embedding(tensors, path, meta)
    blocks = [_validated_vectors(t, path) for t in tensors]
    if len(blocks) == 2 and blocks[0].shape[0] != blocks[1].shape[0]:
        raise UserError(f"{path}: clip_l has {blocks[0].shape[0]} vectors but clip_g {blocks[1].shape[0]}; "
                        "an SDXL word has as many in both; re-export it")
    meta = {"path": str(path), **meta}
    if file_meta:
        meta["file_metadata"] = file_meta
    return Embedding(vectors=blocks[0], token=token, format=fmt, step=step, meta=meta,
                     vectors_2=blocks[1] if len(blocks) == 2 else None)


def _diffusers_partner(path: Path, emb: Embedding) -> Path | None:
    """For one file of diffusers' SDXL pair (`X` + `X_2`), the other one, when it is beside it."""
    if emb.format != "diffusers" or emb.vectors_2 is not None:
        return None
    stem = path.stem
    other_stem = stem[:-2] if stem.endswith("_2") else stem + "_2"
    other = path.with_name(other_stem + path.suffix)
    return other if other.is_file() else None


def _pair_in_folder(folder: Path) -> tuple[Path, Path]:
    for suffix in (".safetensors", ".bin"):
        first, second = (folder / name.replace(".safetensors", suffix) for name in DIFFUSERS_SDXL_FILES)
        if first.is_file() and second.is_file():
            return first, second
    raise UserError(
        f"{folder}: not a file, nor a folder holding diffusers' SDXL pair ({' + '.join(DIFFUSERS_SDXL_FILES)}); "
        "give the path of an embedding file"
    )


def _read_diffusers_pair(first: Path, second: Path) -> Embedding:
    """diffusers' SDXL embedding: {token: [n, 768]} and {token: [n, 1280]} in two files."""
    one, two = _read_one(first), _read_one(second)
    for emb, path in ((one, first), (two, second)):
        if emb.format != "diffusers" or emb.vectors_2 is not None:
            raise UserError(f"{path}: expected diffusers' {{token: tensor}} layout beside {first.name}; "
                            "give a matching pair of files")
    if one.token != two.token or one.num_vectors != two.num_vectors:
        raise UserError(f"{first} and {second} do not hold the same word ({one.token} x{one.num_vectors} vs "
                        f"{two.token} x{two.num_vectors}); give a matching pair")
    meta = {**one.meta, "path": str(first), "path_2": str(second)}
    return Embedding(vectors=one.vectors, token=one.token, format="diffusers", meta=meta, vectors_2=two.vectors)


def _check_file(path: Path) -> None:
    if not path.exists():
        raise UserError(f"{path}: no such file; check the path")
    if not path.is_file():
        raise UserError(f"{path}: not a file; give the path of an embedding file")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise UserError(
            f"{path}: {size / 2**20:.0f} MiB is far too large for an embedding "
            f"(is it a model checkpoint?); give a Textual Inversion embedding file"
        )


def _load(path: Path) -> tuple[Any, dict]:
    """Pick a loader by extension (or by magic bytes when the extension is unknown)."""
    try:
        kind = _kind_from_suffix(path) or _sniff(path)
        if kind is None:
            raise UserError(
                f"{path}: unknown file type; expected .safetensors, .bin, .pt, .ckpt or .png"
            )
        loader: Callable[[Path], tuple[Any, dict]] = {
            "safetensors": _load_safetensors,
            "pickle": _load_pickle,
            "png": _load_png,
        }[kind]
        return loader(path)
    except OSError as exc:
        raise UserError(f"{path}: cannot read it ({exc.strerror or exc}); check its permissions") from exc


def _kind_from_suffix(path: Path) -> str | None:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return "safetensors"
    if suffix in _PICKLE_SUFFIXES:
        return "pickle"
    if suffix == ".png":
        return "png"
    return None


def _sniff(path: Path) -> str | None:
    """Guess the container from its first bytes (used for hints and odd extensions)."""
    with open(path, "rb") as fh:
        head = fh.read(9)
    if head.startswith(b"\x89PNG"):
        return "png"
    if head.startswith(b"PK\x03\x04") or head.startswith(b"\x80"):
        return "pickle"  # torch.save zip archive, or a legacy/raw pickle
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"  # 8-byte header length, then the JSON header
    return None


def _mismatch_hint(path: Path, expected: str) -> str:
    actual = _sniff(path)
    if actual and actual != expected:
        return f" (its contents look like a {actual} file; fix the extension)"
    return ""


def _load_safetensors(path: Path) -> tuple[dict, dict]:
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as fh:
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}
            metadata = dict(fh.metadata() or {})
    except OSError:
        raise
    except Exception as exc:  # SafetensorError and friends: corrupt or not safetensors
        raise UserError(
            f"{path}: not a valid safetensors file{_mismatch_hint(path, 'safetensors')}; "
            f"re-download or re-export it"
        ) from exc
    return tensors, metadata


def _load_pickle(path: Path) -> tuple[Any, dict]:
    """torch.load with weights_only=True: plain tensors and containers only, never code."""
    # The original textual_inversion repo pickled an nn.ParameterDict.  Allowing
    # that one class is safe: it is rebuilt by updating __dict__, nothing is called.
    try:
        with _TORCH_LOAD_LOCK, torch.serialization.safe_globals([torch.nn.ParameterDict]):
            data = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as exc:
        raise _pickle_error(path, exc) from exc
    return data, {}


def _pickle_error(path: Path, exc: Exception) -> UserError:
    """Turn torch.load's multi-line failure into one line saying what to do."""
    text = str(exc)
    if not (isinstance(exc, pickle.UnpicklingError) and "Weights only load failed" in text):
        return UserError(
            f"{path}: not a valid PyTorch file{_mismatch_hint(path, 'pickle')}; "
            f"re-download or re-export it"
        )
    found = re.search(r"unsupported global:?\s+(?:GLOBAL\s+)?([\w.]+)", text, re.IGNORECASE)
    if found:
        return UserError(
            f"{path}: refused to load: it references {found.group(1)}, not just tensors, and a "
            f"pickle can run code; use a .safetensors copy from a trusted source"
        )
    # Garbage bytes and exotic pickles fail the same way; name both.
    return UserError(
        f"{path}: not a valid PyTorch file, or one using pickle features that safe loading "
        f"refuses{_mismatch_hint(path, 'pickle')}; use a .safetensors copy from a trusted source"
    )


def _load_png(path: Path) -> tuple[Any, dict]:
    """A1111 embedding cards (engine.sd.png_card): the base64 JSON of the text chunk, else, as
    A1111 does, the copy hidden in the pixels (a site that strips text chunks leaves it)."""
    from PIL import Image  # imported lazily: only PNG embeddings need it

    try:
        with Image.open(path) as img:
            img.load()
            text = getattr(img, "text", {}).get(PNG_CHUNK)
            hidden = find_hidden(img, object_hook=_decode_png_tensor) if text is None else None
    except OSError:
        raise
    except Exception as exc:
        raise UserError(f"{path}: not a readable PNG image; re-download it") from exc
    if hidden is not None:
        return hidden, {}
    if text is None:
        raise UserError(
            f"{path}: PNG holds no embedding: neither a '{PNG_CHUNK}' text chunk nor A1111's copy in "
            f"its pixels; use the .pt or .safetensors file instead"
        )
    try:
        return json.loads(base64.b64decode(text), object_hook=_decode_png_tensor), {}
    except (ValueError, TypeError, binascii.Error, RecursionError) as exc:
        raise UserError(f"{path}: the '{PNG_CHUNK}' chunk is corrupt; use the .pt file instead") from exc


def _decode_png_tensor(obj: dict) -> Any:
    """A1111 encodes each tensor as {"TORCHTENSOR": nested list}; JSON cannot run code."""
    if "TORCHTENSOR" in obj:
        return torch.from_numpy(np.array(obj["TORCHTENSOR"], dtype=np.float64))
    return obj


# --------------------------------------------------------------------------- layouts


def _parse_layout(data: Any, path: Path) -> tuple[str, tuple, str | None, int | None, dict]:
    """Identify the producer by its keys; return (format, tensors (one per encoder), token, step, meta)."""
    if not isinstance(data, Mapping):
        raise UserError(f"{path}: holds a {type(data).__name__}, not a dict of tensors; {_SUPPORTED}")
    keys = list(data.keys())
    if "string_to_param" in data:
        fmt, tensor, token, step, meta = _parse_a1111(data, path)
        return fmt, (tensor,), token, step, meta
    if len(keys) > 1 and all(is_layer_key(k) for k in keys):
        ordered = sorted(keys, key=layer_order)
        return PER_LAYER_FORMAT, tuple(data[k] for k in ordered), None, None, {"layers": ordered}
    if set(SDXL_KEYS) <= set(keys) and "t5" not in keys:
        ignored = [k for k in ("clip_l_out", "clip_g_out") if k in data]
        _refuse_extra_keys(data, [*SDXL_KEYS, *ignored], path)
        meta = {"ignored": ignored} if ignored else {}
        return ("onetrainer" if ignored else "sdxl"), (data["clip_l"], data["clip_g"]), None, None, meta
    if _MULTI_ENCODER_KEYS & set(keys):
        _refuse_multi_encoder(keys, path)
    for key, fmt, optional in (("emb_params", "kohya", []), ("emp_params", "onetrainer", ["emp_params_out"])):
        if key in data:
            ignored = [k for k in optional if k in data]
            _refuse_extra_keys(data, [key, *ignored], path)
            return fmt, (data[key],), None, None, ({"ignored": ignored} if ignored else {})
    tensor_keys = [k for k, v in data.items() if isinstance(v, torch.Tensor)]
    if len(keys) == 1 and len(tensor_keys) == 1 and isinstance(keys[0], str):
        return "diffusers", (data[keys[0]],), keys[0], None, {}
    if len(tensor_keys) > 1:
        raise UserError(
            f"{path}: holds {len(tensor_keys)} tensors ({_key_list(tensor_keys)}) but an embedding "
            f"holds one; export a single token, or check it is not a model/LoRA file"
        )
    raise UserError(f"{path}: unknown embedding layout, keys found: {_key_list(keys)}; {_SUPPORTED}")


def _parse_a1111(data: Mapping, path: Path) -> tuple[str, Any, str | None, int | None, dict]:
    params = data["string_to_param"]
    # Files saved from an nn.ParameterDict keep their tensors in _parameters
    # (A1111 does the same unwrap for torch 1.11 files).
    params = getattr(params, "_parameters", params)
    if not isinstance(params, Mapping) or len(params) != 1:
        found = _key_list(list(params)) if isinstance(params, Mapping) else type(params).__name__
        raise UserError(
            f"{path}: string_to_param should hold exactly one tensor, found {found or 'none'}; "
            f"export a single-token embedding"
        )
    tensor = next(iter(params.values()))
    name = data.get("name")
    step = data.get("step")
    meta = {
        str(k): v
        for k, v in data.items()
        if k not in ("string_to_param", "string_to_token") and isinstance(v, _SIMPLE_TYPES)
    }
    fmt = "a1111" if "name" in data else "textual_inversion"
    token = name if isinstance(name, str) and name else None
    step = step if isinstance(step, int) and not isinstance(step, bool) else None
    return fmt, tensor, token, step, meta


def _refuse_multi_encoder(keys: list, path: Path) -> None:
    if set(keys) & set(SDXL_KEYS) and not set(keys) - {*SDXL_KEYS, "clip_l_out", "clip_g_out"}:
        raise UserError(f"{path}: holds {_key_list(keys)} but an SDXL embedding needs both clip_l and clip_g; "
                        "re-export it")
    raise NotSupportedError(
        f"{path}: this is a multi-text-encoder embedding ({_key_list(keys)}) for SDXL/SD3/Flux; "
        f"only SD 1.x, SD 2.x and SDXL embeddings are supported"
    )


def _refuse_extra_keys(data: Mapping, expected: list[str], path: Path) -> None:
    extra = [k for k in data if k not in expected]
    if extra:
        names = " + ".join(expected)
        raise UserError(
            f"{path}: unexpected keys beside {names}: {_key_list(extra)}; "
            f"an embedding file holds only {names}"
        )


def _key_list(keys: list, limit: int = 8) -> str:
    shown = [repr(k)[:40] for k in keys[:limit]]
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(shown) + more


def _per_layer_embedding(tensors: tuple, path: Path, meta: dict) -> Embedding:
    """kohya XTI: each layer's [n, dim] checked, all of one shape, kept as one [L*n, dim] block."""
    layers = tuple(meta.pop("layers"))
    blocks = [_validated_vectors(t, f"{path} [{key}]") for t, key in zip(tensors, layers)]
    if len({tuple(b.shape) for b in blocks}) != 1:
        shapes = ", ".join(f"{key} {b.shape[0]}x{b.shape[1]}" for key, b in zip(layers, blocks))
        raise UserError(f"{path}: a per-layer (XTI) word whose layers differ in shape ({shapes}); re-export it")
    return Embedding(vectors=torch.cat(blocks).contiguous(), token=None, format=PER_LAYER_FORMAT,
                     meta={"path": str(path), **meta}, layers=layers)


def layer_blocks(vectors: torch.Tensor, layers) -> torch.Tensor:
    """A per-layer word's [L*n, dim] block as [L, n, dim] (a plain word: [1, n, dim])."""
    count = max(1, len(layers))
    return vectors.reshape(count, vectors.shape[0] // count, vectors.shape[1])


# --------------------------------------------------------------------------- validate


def _validated_vectors(tensor: Any, where: os.PathLike | str) -> torch.Tensor:
    """Check a candidate tensor and return a float32 [n, dim] CPU copy that owns its storage."""
    if not isinstance(tensor, torch.Tensor):
        raise UserError(f"{where}: expected a tensor, found {type(tensor).__name__}; {_SUPPORTED}")
    if tensor.layout != torch.strided:
        raise UserError(f"{where}: the tensor is {tensor.layout}, not dense; re-export it as a dense tensor")
    if not tensor.is_floating_point():
        raise UserError(f"{where}: the tensor is {tensor.dtype}, not floating point; this is not an embedding")
    vectors = _as_matrix(tensor.detach(), where)
    n, dim = vectors.shape
    if n == 0 or dim == 0:
        raise UserError(f"{where}: the embedding is empty (shape {n}x{dim}); re-export it")
    if n > MAX_VECTORS or dim > MAX_WIDTH:
        raise UserError(
            f"{where}: shape {n}x{dim} is not an embedding (at most {MAX_VECTORS} vectors "
            f"of width {MAX_WIDTH}); check the file"
        )
    # Convert before the finiteness check: fp64 values beyond fp32 range become inf.
    vectors = vectors.to(device="cpu", dtype=torch.float32)
    if not bool(torch.isfinite(vectors).all()):
        raise UserError(f"{where}: contains NaN or infinite values (training diverged?); use another file")
    return vectors.clone(memory_format=torch.contiguous_format)


def _as_matrix(tensor: torch.Tensor, where: os.PathLike | str) -> torch.Tensor:
    """[dim] -> [1, dim]; drop leading size-1 dims ([1, n, dim] -> [n, dim]); refuse the rest."""
    while tensor.dim() > 2 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.dim() == 1:
        tensor = tensor.unsqueeze(0)
    if tensor.dim() != 2:
        shape = "x".join(str(s) for s in tensor.shape) or "scalar"
        raise UserError(f"{where}: tensor shape {shape} is not [vectors, width]; this is not an embedding")
    return tensor


def check_width(emb: Embedding, model_widths, model_name: str = "the active model",
                model_family: str | None = None) -> None:
    """Refuse an embedding whose widths (one per encoder) are not the model's text encoders'.

    One line naming both families, e.g. "x.pt: an SD 1.x (768) embedding does not fit
    sdxl-base, an SDXL model (768 + 1280); ..."."""
    widths = (int(model_widths),) if isinstance(model_widths, int) else tuple(int(w) for w in model_widths)
    if emb.widths == widths:
        return
    from engine.sd.family import FAMILY_LABELS

    source = emb.meta.get("path") or emb.token or "the embedding"
    model = describe_widths(widths)
    if model_family and not family_of_widths(widths):
        model = f"{FAMILY_LABELS.get(model_family, model_family)} ({model})"
    raise UserError(
        f"{source}: an embedding for {describe_widths(emb.widths)} does not fit {model_name}, a model of "
        f"{model}; use an embedding made for this model's family, or a model of the embedding's family"
    )


def check_fits(emb: Embedding, info) -> None:
    """check_width against a ModelInfo (engine.sd.models); a per-layer word must also have the
    model's cross-attention layers, one for one."""
    check_width(emb, info.text_widths, info.spec, info.family)
    if emb.layers and tuple(emb.layers) != tuple(info.layers):
        source = emb.meta.get("path") or emb.token or "the embedding"
        model = describe_layers(info.layers) if info.layers else f"none to map ({info.layers_refused})"
        raise UserError(f"{source}: a per-layer (XTI) word of {describe_layers(emb.layers)} does not fit {info.spec}, "
                        f"whose UNet has cross-attention {model}; use a word made for this model's UNet")


def embedding_sha256(vectors) -> str:
    """sha256 of the float32 little-endian bytes, row-major (the shape is not hashed).

    vectors: one [n, dim] tensor, or SDXL's blocks (hashed one after the other)."""
    blocks = [vectors] if isinstance(vectors, torch.Tensor) else list(vectors)
    h = hashlib.sha256()
    for block in blocks:
        flat = block.detach().to(device="cpu", dtype=torch.float32).contiguous()
        h.update(flat.numpy().astype("<f4", copy=False).tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- write


def write_embedding(
    path: os.PathLike | str,
    vectors,
    token: str,
    fmt: str = "diffusers",
    *,
    step: int | None = None,
    model_name: str | None = None,
    layers=(),
) -> Path:
    """Write atomically in `fmt`; return the (first) final path.

    vectors: one [n, dim] tensor (SD 1.x/2.x), or a tuple of blocks, one per text
    encoder (SDXL: clip_l, clip_g).  A path without a known embedding extension gets
    the format's default one appended (``.safetensors``, or ``.pt`` for a1111 on
    SD 1.x/2.x); a known but wrong one is refused, because the reader picks its
    loader by extension.  diffusers on SDXL writes two files: ``X`` and ``X_2``.
    """
    return write_embedding_files(path, vectors, token, fmt, step=step, model_name=model_name, layers=layers)[0]


def write_embedding_files(path: os.PathLike | str, vectors, token: str, fmt: str = "diffusers", *,
                          step: int | None = None, model_name: str | None = None, layers=()) -> list[Path]:
    """write_embedding, returning every file written (two for diffusers on SDXL).  `layers`: the
    layers of a per-layer word (its block is [L*n, dim]), which only kohya-xti holds."""
    if fmt not in FORMATS_WRITE:
        raise UserError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS_WRITE)}")
    if not isinstance(token, str) or not token.strip():
        raise UserError("the embedding token is empty; give a token name")
    blocks = [vectors] if isinstance(vectors, torch.Tensor) else list(vectors)
    if layers or fmt == PER_LAYER_FORMAT:
        return [_write_per_layer(Path(path), blocks, tuple(layers), fmt)]
    if len(blocks) not in (1, 2):
        raise UserError(f"an embedding has one block per text encoder (1 or 2), not {len(blocks)}")
    final = _target_path(Path(path), fmt, sdxl=len(blocks) == 2)
    blocks = [_validated_vectors(b, final) for b in blocks]
    if len(blocks) == 2:
        return _write_sdxl(final, blocks, token, fmt)
    writer = {"diffusers": _write_diffusers, "a1111": _write_a1111, "kohya": _write_kohya, "comfy": _write_kohya}[fmt]
    with atomic_path(final) as tmp:
        writer(tmp, final, blocks[0], token, step, model_name)
    return [final]


def _target_path(path: Path, fmt: str, sdxl: bool = False) -> Path:
    allowed = (_WRITE_SUFFIXES_SDXL if sdxl else _WRITE_SUFFIXES)[fmt]
    suffix = path.suffix.lower()
    if suffix in allowed:
        return path
    if suffix in _KNOWN_SUFFIXES:
        what = f"an SDXL {fmt}" if sdxl else f"a {fmt}"
        raise UserError(
            f"{path}: {what} embedding is written as {' or '.join(allowed)}, not {suffix}; "
            f"change the file name or the format"
        )
    return path.with_name(path.name + allowed[0])


def run_format(blocks, layers=()) -> str:
    """How a run keeps its embeddings: diffusers' {token: [n, d]} (SD 1.x/2.x), one clip_l +
    clip_g file (SDXL), which every SDXL tool reads, or kohya's XTI layout (a per-layer word)."""
    if layers:
        return PER_LAYER_FORMAT
    return "diffusers" if len(list(blocks)) == 1 else "kohya"


def _write_per_layer(path: Path, blocks: list, layers: tuple[str, ...], fmt: str) -> Path:
    """kohya's XTI file: {layer: [n, dim]} for every layer, no metadata (kohya writes none)."""
    if not layers:
        raise UserError(f"{fmt} holds per-layer words (P+ / XTI) and this word has one vector set; "
                        "export it with --format kohya (or diffusers, a1111)")
    if fmt != PER_LAYER_FORMAT:
        raise UserError(f"{fmt} files hold one vector set, not this word's {describe_layers(layers)}; "
                        f"export it with --format {PER_LAYER_FORMAT}")
    if len(blocks) != 1:
        raise UserError("per-layer words are SD 1.x/2.x words of one text encoder; this one has "
                        f"{len(blocks)} blocks")
    final = _target_path(path, fmt)
    per_layer = layer_blocks(blocks[0], layers)
    tensors = {key: _validated_vectors(per_layer[i], f"{final} [{key}]") for i, key in enumerate(layers)}
    with atomic_path(final) as tmp:
        safetensors.torch.save_file(tensors, str(tmp))
    return final


def second_file(path: Path) -> Path:
    """diffusers' SDXL pair: `learned_embeds.safetensors` -> `learned_embeds_2.safetensors`."""
    return path.with_name(path.stem + "_2" + path.suffix)


def _write_sdxl(final: Path, blocks: list[torch.Tensor], token: str, fmt: str) -> list[Path]:
    if blocks[0].shape[0] != blocks[1].shape[0]:
        raise UserError(f"an SDXL word has as many vectors in both encoders, not {blocks[0].shape[0]} and "
                        f"{blocks[1].shape[0]}")
    if fmt != "diffusers":  # kohya, A1111, ComfyUI, OneTrainer all read this one file
        with atomic_path(final) as tmp:
            safetensors.torch.save_file(dict(zip(SDXL_KEYS, blocks)), str(tmp))
        return [final]
    # diffusers' textual_inversion_sdxl.py layout: two files, each {token: [n, d]}.  Both are
    # written to temp files first; if the second rename fails the first is removed again.
    paths = [final, second_file(final)]
    existed = final.exists()
    try:
        with atomic_path(paths[1]) as tmp_2, atomic_path(paths[0]) as tmp_1:
            for tmp, path, block in ((tmp_1, paths[0], blocks[0]), (tmp_2, paths[1], blocks[1])):
                _write_diffusers(tmp, path, block, token)
    except BaseException:
        if not existed and paths[0].exists() and not paths[1].exists():
            paths[0].unlink()
        raise
    return paths


def _write_diffusers(tmp: Path, final: Path, tensor: torch.Tensor, token: str, *_: Any) -> None:
    if final.suffix.lower() == ".bin":
        torch.save({token: tensor}, tmp)
    else:
        safetensors.torch.save_file({token: tensor}, str(tmp), metadata={"format": "pt"})


def _write_a1111(
    tmp: Path, final: Path, tensor: torch.Tensor, token: str, step: int | None, model_name: str | None
) -> None:
    # Only plain types and a plain Tensor, so weights_only loaders accept the file.
    data = {
        "string_to_token": {"*": A1111_TOKEN_ID},
        "string_to_param": {"*": tensor},
        "name": token,
        "step": int(step) if step is not None else None,
        "sd_checkpoint": None,
        "sd_checkpoint_name": model_name,
    }
    torch.save(data, tmp)


def _write_kohya(tmp: Path, final: Path, tensor: torch.Tensor, *_: Any) -> None:
    safetensors.torch.save_file({"emb_params": tensor}, str(tmp))
