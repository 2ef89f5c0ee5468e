"""Helpers shared by the demo's training scripts and tests (no training here)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from demo import world as W

REPO = Path(__file__).resolve().parents[1]
LOGS = REPO / "demo" / "logs"
BUILD = Path(os.environ.get("TISTUDIO_DEMO_BUILD", "/tmp/tistudio-demo-build"))


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """[N, 32, 32, 3] uint8 -> [N, 3, 32, 32] float in [-1, 1] (the judge's and the VAE's input)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def roundtrip(images: np.ndarray) -> np.ndarray:
    """What the library path does to a world image: NEAREST x2 up to 64 px, then bicubic back to 32."""
    from PIL import Image

    out = np.empty_like(images)
    for i, im in enumerate(images):
        big = Image.fromarray(W.upsample(im, 2))
        out[i] = np.asarray(big.resize((W.SIZE, W.SIZE), Image.Resampling.BICUBIC))
    return out


def clip_text_ids(captions: list[str], context: int | None = None) -> torch.Tensor:
    """open_clip token ids (zero padded), cut to the longest caption when context is None."""
    import open_clip

    ids = open_clip.tokenizer.tokenize(captions)
    if context is None:
        context = int((ids != 0).sum(1).max())
    return ids[:, :context]


def encode_text_short(model, ids: torch.Tensor) -> torch.Tensor:
    """open_clip's encode_text on a shorter context (training speed): same result on the real tokens."""
    L = ids.shape[1]
    x = model.token_embedding(ids) + model.positional_embedding[:L]
    x = model.transformer(x, attn_mask=model.attn_mask[:L, :L])
    x = model.ln_final(x)
    pooled = x[torch.arange(x.shape[0]), ids.argmax(dim=-1)]
    return pooled @ model.text_projection


@torch.no_grad()
def classify(model, images: torch.Tensor, prompts: list[str], batch: int = 256) -> torch.Tensor:
    """Index of the best prompt for each image ([N] long)."""
    text = model.encode_text(clip_text_ids(prompts, 77))
    text = text / text.norm(dim=-1, keepdim=True)
    out = []
    for chunk in images.split(batch):
        feats = model.encode_image(chunk)
        feats = feats / feats.norm(dim=-1, keepdim=True)
        out.append((feats @ text.T).argmax(dim=-1))
    return torch.cat(out)


def shape_colour_prompts() -> tuple[list[str], list[tuple[str, str]]]:
    pairs = [(c, s) for c in W.COLOURS for s in W.SHAPES]
    return [f"a {c} {s}" for c, s in pairs], pairs


def shape_colour_accuracy(model, images: torch.Tensor, scenes: list[W.Scene]) -> dict:
    """Zero-shot: the best of the 48 prompts "a {colour} {shape}"; shape and colour read from it."""
    prompts, pairs = shape_colour_prompts()
    pred = classify(model, images, prompts).tolist()
    shape = np.mean([pairs[p][1] == s.shape for p, s in zip(pred, scenes)])
    colour = np.mean([pairs[p][0] == s.colour for p, s in zip(pred, scenes)])
    both = np.mean([pairs[p] == (s.colour, s.shape) for p, s in zip(pred, scenes)])
    return {"shape": float(shape), "colour": float(colour), "both": float(both)}


@torch.no_grad()
def judge_report(model, n: int = 600, seed: int = 99) -> dict:
    """The judge's zero-shot accuracies on fresh world images (seed 99 is never trained on)."""
    rng = np.random.default_rng(seed)
    plain = [W.sample_scene(rng, toy="", style="") for _ in range(n)]
    styled = [W.sample_scene(rng, toy="") for _ in range(n // 2)]
    styled = [s for s in styled if s.style]
    toys = [W.sample_scene(rng, toy=W.TOYS[i % len(W.TOYS)], style="") for i in range(n // 2)]
    painted = [W.sample_scene(rng, style=W.STYLES[i % len(W.STYLES)]) for i in range(n // 2)]
    out = {"plain": shape_colour_accuracy(model, to_tensor(W.render_batch(plain)), plain)}
    out["plain_roundtrip"] = shape_colour_accuracy(model, to_tensor(roundtrip(W.render_batch(plain))), plain)
    out["styled"] = shape_colour_accuracy(model, to_tensor(W.render_batch(styled)), styled)
    pred = classify(model, to_tensor(W.render_batch(toys)), [f"a {W.TOY_NAMES[t]}" for t in W.TOYS])
    out["toy"] = float(np.mean([W.TOYS[p] == s.toy for p, s in zip(pred.tolist(), toys)]))
    pred = classify(model, to_tensor(W.render_batch(painted)), [f"a {W.STYLE_NAMES[t]} painting" for t in W.STYLES])
    out["style"] = float(np.mean([W.STYLES[p] == s.style for p, s in zip(pred.tolist(), painted)]))
    return out


class Log:
    """A JSON training log (loss curve + evaluations), rewritten atomically as it grows."""

    def __init__(self, path: Path, meta: dict):
        self.path = Path(path)
        if self.path.exists():
            self.data = json.loads(self.path.read_text())
            self.data["meta"].update(meta)
        else:
            self.data = {"meta": meta, "loss": [], "evals": []}
        self.t0 = time.time() - self.data["meta"].get("elapsed_s", 0.0)

    def loss(self, step: int, value: float, **extra) -> None:
        self.data["loss"].append({"step": step, "loss": round(float(value), 5), **extra})

    def eval(self, step: int, **values) -> None:
        self.data["evals"].append({"step": step, **values})

    def save(self, **meta) -> None:
        self.data["meta"]["elapsed_s"] = round(time.time() - self.t0, 1)
        self.data["meta"].update(meta)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        tmp.replace(self.path)


def save_fp16(state: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to(torch.float16).contiguous() for k, v in state.items()}
    save_file(tensors, str(path), metadata={k: str(v) for k, v in (metadata or {}).items()})


# --- resumable training state (the build folder's *_ckpt.pt) ------------------------------------


def save_checkpoint(path: Path, rng: np.random.Generator, step: int, **stateful) -> None:
    """Write the state of every `stateful` thing (models, an EMA copy, optimizers: anything with
    state_dict) with both RNG streams and the step, atomically (a temp file renamed over `path`)."""
    state = {name: obj.state_dict() for name, obj in stateful.items()}
    state.update(rng=rng.bit_generator.state, torch_rng=torch.get_rng_state(), step=step)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def resume(path: Path, rng: np.random.Generator, **stateful) -> int:
    """Load what `save_checkpoint` wrote into the same things and RNG streams; return the step it
    was saved at, or 0 (touching nothing) when there is no checkpoint yet."""
    if not path.exists():
        return 0
    ck = torch.load(path, weights_only=True)
    for name, obj in stateful.items():
        obj.load_state_dict(ck[name])
    rng.bit_generator.state = ck["rng"]
    torch.set_rng_state(ck["torch_rng"])
    print(f"resumed at step {ck['step']}", flush=True)
    return ck["step"]
