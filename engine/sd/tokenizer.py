"""The real CLIP tokenizer, built offline from open_clip's bundled BPE merges.

SD's tokenizer is OpenAI CLIP's BPE.  open_clip ships those merges as
`bpe_simple_vocab_16e6.txt.gz`; from them we derive the `vocab.json` and
`merges.txt` that `transformers.CLIPTokenizer` reads, in the same order CLIP
builds its vocabulary, so ids match SD's (`<|startoftext|>` = 49406).
The files are derived once and cached.

Two paddings exist in the wild: SD 1.x (and SDXL's first tokenizer) pad with
`<|endoftext|>`; SD 2.x and SDXL's second tokenizer pad with `!` (id 0), as
OpenCLIP did.  Padded positions reach the UNet, so the choice matters.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
from pathlib import Path

from engine.store.paths import atomic_write_text

VOCAB_SIZE = 49408
EOS = "<|endoftext|>"
PAD_BANG = "!"  # OpenCLIP's padding (SD 2.x, SDXL's tokenizer_2): id 0
_MERGE_COUNT = 49152 - 256 - 2


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable unicode table (same as GPT-2's)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _bpe_path() -> Path:
    # find the data file without importing open_clip (which imports torch)
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("open_clip_torch is not installed; it ships the CLIP vocabulary we need")
    return Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"


def derive_tokenizer_files(out_dir: Path, pad: str = EOS) -> Path:
    """Write vocab.json, merges.txt and tokenizer configs for CLIPTokenizer into out_dir."""
    lines = gzip.open(_bpe_path()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _MERGE_COUNT + 1]]
    base = list(_bytes_to_unicode().values())
    vocab = base + [v + "</w>" for v in base] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == VOCAB_SIZE, len(vocab)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "vocab.json", json.dumps({t: i for i, t in enumerate(vocab)}))
    atomic_write_text(
        out_dir / "merges.txt", "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n"
    )
    config = {
        "model_max_length": 77,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": pad,
        "do_lower_case": True,
        "tokenizer_class": "CLIPTokenizer",
    }
    atomic_write_text(out_dir / "tokenizer_config.json", json.dumps(config, indent=2))
    atomic_write_text(
        out_dir / "special_tokens_map.json",
        json.dumps({k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}),
    )
    return out_dir


def tokenizer_dir(pad: str = EOS) -> Path:
    """The cached folder of derived tokenizer files padding with `pad` (created on first use)."""
    if pad not in (EOS, PAD_BANG):
        raise ValueError(f"unknown CLIP padding {pad!r}")
    import platformdirs  # here, not at the top: reading a model's configs (model_info) needs no cache

    root = Path(os.environ.get("TISTUDIO_CACHE") or platformdirs.user_cache_dir("tistudio"))
    out = root / ("clip-tokenizer-v1" if pad == EOS else "clip-tokenizer-v1-pad-bang")
    if not (out / "special_tokens_map.json").exists():
        derive_tokenizer_files(out, pad)
    return out


@functools.lru_cache(maxsize=2)
def _cached_tokenizer(pad: str):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(tokenizer_dir(pad)))


def load_clip_tokenizer(pad: str = EOS):
    """A fresh copy of SD's CLIP tokenizer (callers may add tokens to it).

    pad: EOS for SD 1.x and SDXL's first encoder, PAD_BANG for SD 2.x and SDXL's second."""
    return clone_tokenizer(_cached_tokenizer(pad))


def clone_tokenizer(tokenizer):
    """A copy of a transformers tokenizer that tokens can be added to without touching the
    original.  copy.deepcopy rebuilds the fast tokenizer's BPE model from its JSON (~0.3 CPU-s
    for CLIP's 49,408 words, paid by every training run and generation that adds a word); this
    shares the model instead, which adding tokens never changes (they live in the tokenizer's own
    added vocabulary), and copies the rest.  A tokenizer without a fast backend is deep-copied."""
    import copy

    backend = getattr(tokenizer, "_tokenizer", None)
    clone = _clone_backend(backend) if backend is not None else None
    if clone is None:
        return copy.deepcopy(tokenizer)
    return copy.deepcopy(tokenizer, {id(backend): clone})  # the wrapper's own state, over the clone


def _clone_backend(backend):
    """A `tokenizers.Tokenizer` sharing `backend`'s model, with its own pipeline settings and
    added tokens (the same ids); None if those ids cannot be reproduced."""
    from tokenizers import Tokenizer

    clone = Tokenizer(backend.model)  # shares the model: nothing we do adds to it
    for part in ("normalizer", "pre_tokenizer", "post_processor", "decoder"):
        if getattr(backend, part) is not None:
            setattr(clone, part, getattr(backend, part))
    if backend.truncation:
        t = backend.truncation
        clone.enable_truncation(t["max_length"], stride=t["stride"], strategy=t["strategy"], direction=t["direction"])
    if backend.padding:
        clone.enable_padding(**backend.padding)
    added = backend.get_added_tokens_decoder()
    for i in sorted(added):  # in id order, so each gets the id it had
        (clone.add_special_tokens if added[i].special else clone.add_tokens)([added[i]])
    same = {i: t.content for i, t in clone.get_added_tokens_decoder().items()} == \
        {i: t.content for i, t in added.items()}
    return clone if same else None
