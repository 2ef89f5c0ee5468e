"""Textual Inversion embedding files: read every common layout, write three.

Embeddings come from many trainers, each with its own dict layout, and often
as pickles, which can run arbitrary code when loaded naively.  This module is
the one place that turns a file into a validated float32 ``[n, dim]`` tensor,
and a tensor back into a file that diffusers, A1111 or kohya can load.

Layouts recognised on read (by their keys):

* diffusers       ``{token: [n, dim]}`` (old files: ``[dim]``), .safetensors or .bin
* a1111           ``{"string_to_param": {"*": [n, dim]}, "name": ..., "step": ...}``
                  as .pt, or the same dict in a PNG ``sd-ti-embedding`` text chunk
* textual_inversion  the original repo: like a1111 but with no ``name``
* kohya           ``{"emb_params": [n, dim]}`` (also invoke-training)
* onetrainer      ``{"emp_params": [n, dim]}`` (sic)

SDXL / SD3 / Flux embeddings (``clip_l``, ``clip_g``, ``t5`` keys) are
recognised only to be refused with a clear message.
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
from engine.paths import atomic_path

FORMATS_READ = ("diffusers", "a1111", "kohya", "onetrainer", "textual_inversion")
FORMATS_WRITE = ("diffusers", "a1111", "kohya")

# CLIP's context is 77 tokens including BOS/EOS, so a prompt can never hold
# more than 75 vectors of one embedding; anything bigger is not an embedding.
MAX_VECTORS = 75
MAX_WIDTH = 4096
# The largest legal embedding is 75 x 4096 x fp64 = 2.4 MB; 64 MiB leaves room
# for pickle overhead while refusing model checkpoints before loading them.
MAX_FILE_BYTES = 64 * 1024 * 1024

# A1111 always writes this id (CLIP's id for "*") and ignores it on load.
A1111_TOKEN_ID = 265
PNG_CHUNK = "sd-ti-embedding"

_SUPPORTED = (
    "supported: diffusers ({token: tensor}), A1111 .pt/.png, kohya/invoke-training "
    "(emb_params), OneTrainer (emp_params), original textual_inversion .pt"
)
_PICKLE_SUFFIXES = (".bin", ".pt", ".ckpt")
_WRITE_SUFFIXES = {"diffusers": (".safetensors", ".bin"), "a1111": (".pt",), "kohya": (".safetensors",)}
_KNOWN_SUFFIXES = {".safetensors", ".png", *_PICKLE_SUFFIXES}
_MULTI_ENCODER_KEYS = {"clip_l", "clip_g", "t5"}
_SIMPLE_TYPES = (str, int, float, bool, type(None))
# torch's safe_globals() edits a process-wide allowlist and removes on exit, so
# two overlapping loads could strip each other's entry: serialise our loads.
_TORCH_LOAD_LOCK = threading.Lock()


@dataclass
class Embedding:
    """A validated embedding: float32 ``[n, dim]`` vectors plus what the file said."""

    vectors: torch.Tensor  # float32, [n, dim], contiguous, CPU, owns its storage
    token: str | None  # token/name stored in the file (diffusers key, A1111 "name")
    format: str  # one of FORMATS_READ
    step: int | None = None
    meta: dict = field(default_factory=dict)  # "path", file metadata, A1111 extras

    @property
    def width(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def num_vectors(self) -> int:
        return int(self.vectors.shape[0])


# --------------------------------------------------------------------------- read


def read_embedding(path: os.PathLike | str) -> Embedding:
    """Load and validate an embedding file; every problem is a one-line UserError."""
    path = Path(path)
    _check_file(path)
    data, file_meta = _load(path)
    fmt, tensor, token, step, meta = _parse_layout(data, path)
    vectors = _validated_vectors(tensor, path)
    meta = {"path": str(path), **meta}
    if file_meta:
        meta["file_metadata"] = file_meta
    return Embedding(vectors=vectors, token=token, format=fmt, step=step, meta=meta)


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
    """A1111 embedding images: base64 JSON in a text chunk (pixel-hidden data is not read)."""
    from PIL import Image  # imported lazily: only PNG embeddings need it

    try:
        with Image.open(path) as img:
            img.load()
            text = getattr(img, "text", {}).get(PNG_CHUNK)
    except OSError:
        raise
    except Exception as exc:
        raise UserError(f"{path}: not a readable PNG image; re-download it") from exc
    if text is None:
        raise UserError(
            f"{path}: PNG has no '{PNG_CHUNK}' text chunk (embeddings hidden in the pixels "
            f"are not supported); use the .pt or .safetensors file instead"
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


def _parse_layout(data: Any, path: Path) -> tuple[str, Any, str | None, int | None, dict]:
    """Identify the producer by its keys; return (format, tensor, token, step, meta)."""
    if not isinstance(data, Mapping):
        raise UserError(f"{path}: holds a {type(data).__name__}, not a dict of tensors; {_SUPPORTED}")
    keys = list(data.keys())
    if "string_to_param" in data:
        return _parse_a1111(data, path)
    if _MULTI_ENCODER_KEYS & set(keys):
        _refuse_multi_encoder(keys, path)
    for key, fmt in (("emb_params", "kohya"), ("emp_params", "onetrainer")):
        if key in data:
            _refuse_extra_keys(data, key, path)
            return fmt, data[key], None, None, {}
    tensor_keys = [k for k, v in data.items() if isinstance(v, torch.Tensor)]
    if len(keys) == 1 and len(tensor_keys) == 1 and isinstance(keys[0], str):
        return "diffusers", data[keys[0]], keys[0], None, {}
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
    if {"clip_l", "clip_g"} <= set(keys):
        raise NotSupportedError(
            f"{path}: this is an SDXL embedding (clip_l + clip_g); SDXL models are not "
            f"supported yet, use an SD 1.x/2.x embedding"
        )
    raise NotSupportedError(
        f"{path}: this is a multi-text-encoder embedding ({_key_list(keys)}) for SDXL/SD3/Flux; "
        f"only SD 1.x/2.x embeddings are supported"
    )


def _refuse_extra_keys(data: Mapping, expected: str, path: Path) -> None:
    extra = [k for k in data if k != expected]
    if extra:
        raise UserError(
            f"{path}: unexpected keys beside {expected}: {_key_list(extra)}; "
            f"an embedding file holds only {expected}"
        )


def _key_list(keys: list, limit: int = 8) -> str:
    shown = [repr(k)[:40] for k in keys[:limit]]
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(shown) + more


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


def check_width(emb: Embedding, model_width: int, model_name: str = "the active model") -> None:
    """Refuse an embedding whose width does not match the model's text encoder."""
    if emb.width == model_width:
        return
    source = emb.meta.get("path") or emb.token or "the embedding"
    raise UserError(
        f"{source}: embedding width {emb.width}{_family(emb.width)} does not match "
        f"{model_name} width {model_width}{_family(model_width)}; use a model of the same family"
    )


def _family(width: int) -> str:
    families = {768: "SD 1.x", 1024: "SD 2.x", 1280: "SDXL clip_g"}
    return f" ({families[width]})" if width in families else ""


def embedding_sha256(vectors: torch.Tensor) -> str:
    """sha256 of the float32 little-endian bytes, row-major (the shape is not hashed)."""
    flat = vectors.detach().to(device="cpu", dtype=torch.float32).contiguous()
    return hashlib.sha256(flat.numpy().astype("<f4", copy=False).tobytes()).hexdigest()


# --------------------------------------------------------------------------- write


def write_embedding(
    path: os.PathLike | str,
    vectors: torch.Tensor,
    token: str,
    fmt: str = "diffusers",
    *,
    step: int | None = None,
    model_name: str | None = None,
) -> Path:
    """Write atomically in `fmt`; return the final path.

    A path without a known embedding extension gets the format's default one
    appended (``.safetensors``, or ``.pt`` for a1111); a known but wrong one is
    refused, because the reader picks its loader by extension.
    """
    if fmt not in FORMATS_WRITE:
        raise UserError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS_WRITE)}")
    if not isinstance(token, str) or not token.strip():
        raise UserError("the embedding token is empty; give a token name")
    final = _target_path(Path(path), fmt)
    tensor = _validated_vectors(vectors, final)
    writer = {"diffusers": _write_diffusers, "a1111": _write_a1111, "kohya": _write_kohya}[fmt]
    with atomic_path(final) as tmp:
        writer(tmp, final, tensor, token, step, model_name)
    return final


def _target_path(path: Path, fmt: str) -> Path:
    allowed = _WRITE_SUFFIXES[fmt]
    suffix = path.suffix.lower()
    if suffix in allowed:
        return path
    if suffix in _KNOWN_SUFFIXES:
        raise UserError(
            f"{path}: a {fmt} embedding is written as {' or '.join(allowed)}, not {suffix}; "
            f"change the file name or the format"
        )
    return path.with_name(path.name + allowed[0])


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
