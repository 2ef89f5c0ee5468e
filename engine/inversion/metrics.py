"""CLIP scores for a learned word: what it bought (reconstruction) and what it cost (editability).

As in the study (section 6) and Gal et al.:

* reconstruction  mean pairwise cosine between the CLIP image embeddings of
                  images generated from a neutral prompt and of the training images;
* editability     for each edit prompt, the cosine between the MEAN image embedding
                  of its images and the prompt's CLIP text embedding; the mean over
                  prompts (the paper's definition, our default).  The original TI code
                  averages per-image text-image cosines instead: `editability_per_image`.

The paper does not say how the placeholder is treated when an edit prompt is
embedded as text; the original TI code removes it, and so do we (the report says so).
The SD row is the same measurement with the concept's description written where
the token would stand.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.errors import UserError
from engine.sd.generation import (
    SAMPLER,
    GenerateRequest,
    generate,
    load_used,
    sub_progress,
    timestamp_id,
)
from engine.settings.prompts import edit_prompts, fill, load_prompts, neutral_prompt, without_placeholder
from engine.store.paths import atomic_write_json, atomic_write_text

PAPER_TABLE = {"SD": (0.5622, 0.2639), "SD+TI": (0.8077, 0.1611)}  # reconstruction, editability
NOTES = "placeholder removed from edit prompts before CLIP text encoding"
BUILTIN_TINY = "builtin:tiny"
TINY_SPECS = ("builtin:tiny", "builtin:sd2-tiny", "builtin:sdxl-tiny")

# A small CLIP with the real tokenizer (vocab 49408, context 77): random weights, seconds on a CPU.
TINY_CLIP = dict(
    embed_dim=32,
    vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=2, head_width=16),
    text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=4, layers=2),
)


# --- CLIP -----------------------------------------------------------------------------------------


@dataclass
class Clip:
    model: torch.nn.Module
    preprocess: object  # PIL image -> [3, S, S] tensor
    tokenizer: object  # list[str] -> [N, 77] ids
    name: str
    weights: str | None
    device: torch.device

    @torch.no_grad()
    def images(self, images: list) -> torch.Tensor:
        """Unit-length image embeddings, [N, D] float32 on the CPU."""
        out = []
        for start in range(0, len(images), 32):
            batch = torch.stack([self.preprocess(im.convert("RGB")) for im in images[start : start + 32]])
            out.append(self.model.encode_image(batch.to(self.device)).float())
        return torch.nn.functional.normalize(torch.cat(out), dim=-1).cpu()

    @torch.no_grad()
    def texts(self, texts: list[str]) -> torch.Tensor:
        """Unit-length text embeddings, [N, D] float32 on the CPU."""
        ids = self.tokenizer(list(texts)).to(self.device)
        return torch.nn.functional.normalize(self.model.encode_text(ids).float(), dim=-1).cpu()

    def describe(self) -> dict:
        return {"name": self.name, "weights": self.weights}


def load_clip(name: str = "ViT-B-32", weights: os.PathLike | str | None = None, device="cpu") -> Clip:
    """An open_clip model with its preprocessing and tokenizer; never downloads anything."""
    import open_clip

    device = torch.device(device)
    if name == BUILTIN_TINY:
        model, image_size = _tiny_clip(), TINY_CLIP["vision_cfg"]["image_size"]
        preprocess = open_clip.image_transform(image_size, is_train=False)
        tokenizer = open_clip.get_tokenizer("ViT-B-32")  # the real CLIP BPE, bundled with open_clip
        if weights is not None:
            _load_weights(model, name, Path(weights).expanduser())
    elif name == "builtin:demo":  # the demo world's own CLIP (engine/sd/demo_weights)
        from engine.sd.demo_model import load_demo_clip

        model, preprocess, tokenizer = load_demo_clip(device)
    elif ":" in name and weights is None:  # e.g. ViT-B-32:openai — open_clip's own pretrained tags
        model, preprocess, tokenizer = _pretrained_clip(name)
    else:
        if name not in open_clip.list_models():
            raise UserError(f"unknown CLIP model {name!r}; use an open_clip name such as ViT-B-32 or ViT-L-14")
        if weights is None:
            raise UserError(
                f"CLIP {name} needs its weights and nothing is downloaded here; pass --clip-weights PATH "
                f"(an open_clip checkpoint) or --clip {BUILTIN_TINY} for a smoke test"
            )
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
        _load_weights(model, name, Path(weights).expanduser())
        try:
            tokenizer = open_clip.get_tokenizer(name)
        except Exception as exc:  # noqa: BLE001 - hub-backed tokenizers would need a download
            raise UserError(
                f"CLIP {name}'s tokenizer is not available offline ({type(exc).__name__}); use a CLIP ViT model"
            ) from None
    model.to(device).eval().requires_grad_(False)
    return Clip(model, preprocess, tokenizer, name, None if weights is None else str(weights), device)


def default_clip(model_spec: str | None) -> str:
    """The CLIP that fits the model: a built-in world's own CLIP, else OpenAI's ViT-B/32 (the TI paper's)."""
    from engine.sd.models import resolve_spec

    spec = resolve_spec(model_spec)
    if spec in TINY_SPECS:  # random-weight test models: a random CLIP measures them as well as any
        return BUILTIN_TINY
    if spec == "builtin:demo":
        return "builtin:demo"
    return "ViT-B-32:openai"


def _pretrained_clip(name: str):
    """open_clip's pretrained weights by tag (downloads once into the HF cache; works offline when cached)."""
    import open_clip

    arch, _, tag = name.partition(":")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=tag)
        return model, preprocess, open_clip.get_tokenizer(arch)
    except Exception as exc:  # noqa: BLE001 - unknown tag, no network, not cached: all mean "not available"
        raise UserError(
            f"CLIP {name} could not be loaded ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); "
            "pass --clip-weights PATH to a local open_clip checkpoint"
        ) from None


def _tiny_clip():
    from open_clip.model import CLIP

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the same random CLIP on every call and machine
        return CLIP(**TINY_CLIP)


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

    state = _read_state_dict(_checkpoint_file(path))
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


# --- the scores -------------------------------------------------------------------------------------


def _unit(x) -> torch.Tensor:
    x = torch.as_tensor(x, dtype=torch.float64)
    return x / x.norm(dim=-1, keepdim=True)


def reconstruction(gen_image_embs, train_image_embs) -> float:
    """Mean cosine over every (generated, training) pair."""
    return float((_unit(gen_image_embs) @ _unit(train_image_embs).T).mean())


def _check_pairs(image_embs_per_prompt, text_embs) -> None:
    if len(image_embs_per_prompt) != len(text_embs) or len(text_embs) == 0:
        raise ValueError("one image set per prompt is needed")


def editability_paper_per_prompt(image_embs_per_prompt, text_embs) -> list[float]:
    """Per prompt: cosine between the mean image embedding and the text embedding."""
    _check_pairs(image_embs_per_prompt, text_embs)
    scores = []
    for images, text in zip(image_embs_per_prompt, _unit(text_embs)):
        mean = _unit(images).mean(dim=0)
        scores.append(float(mean @ text / mean.norm()))
    return scores


def editability_per_image_per_prompt(image_embs_per_prompt, text_embs) -> list[float]:
    """Per prompt: mean of the per-image text-image cosines (the original TI code's variant)."""
    _check_pairs(image_embs_per_prompt, text_embs)
    return [float((_unit(images) @ text).mean()) for images, text in zip(image_embs_per_prompt, _unit(text_embs))]


def editability_paper(image_embs_per_prompt, text_embs) -> float:
    scores = editability_paper_per_prompt(image_embs_per_prompt, text_embs)
    return sum(scores) / len(scores)


def editability_per_image(image_embs_per_prompt, text_embs) -> float:
    scores = editability_per_image_per_prompt(image_embs_per_prompt, text_embs)
    return sum(scores) / len(scores)


# --- measuring one row (SD, or SD with one embedding) -----------------------------------------------


def training_images(concept) -> list:
    from engine.store.images import load_image

    paths = concept.images
    if not paths:
        raise UserError(f"concept {concept.name!r} has no training images; add some before measuring")
    return [load_image(p).convert("RGB") for p in paths]


def _load_pngs(results: list[dict]) -> list:
    from PIL import Image

    images = []
    for r in results:
        with Image.open(r["path"]) as im:
            images.append(im.convert("RGB"))
    return images


def measure(model, library, concept, ref: str | None, prompts: list[str], clip: Clip, train_embs: torch.Tensor, *,
            out_dir: Path, images: int, seed: int, sample_steps: int = 25, guidance: float = 7.5,
            batch_size: int | None = None, progress=None, cancelled=None) -> dict:
    """Generate the reconstruction set and one set per edit prompt, then score them.

    ref None: SD alone (description for the token); else the --use string of the embedding.
    Every set uses the same seeds, so the SD and SD+TI rows are paired image for image.
    """
    mode = "sd" if ref is None else "ti"
    templates = [neutral_prompt(concept.property)] + list(prompts)
    sets = []
    for i, template in enumerate(templates):
        request = GenerateRequest(
            prompt=fill(template, concept.token), n=images, seed=seed, steps=sample_steps, guidance=guidance,
            mode=mode, uses=[ref] if ref else [], out_dir=out_dir / ("reconstruction" if i == 0 else f"edit-{i}"),
            batch_size=batch_size,
        )
        set_progress = sub_progress(progress, i / len(templates), 1 / len(templates))
        results = generate(model, library, request, set_progress, cancelled)
        sets.append((results, _load_pngs(results)))
    embs = [clip.images(pils) for _, pils in sets]
    texts = clip.texts([without_placeholder(t) for t in prompts])
    paper = editability_paper_per_prompt(embs[1:], texts)
    per_image = editability_per_image_per_prompt(embs[1:], texts)
    return {
        "reconstruction": reconstruction(embs[0], train_embs),
        "editability": sum(paper) / len(paper),
        "editability_per_image": sum(per_image) / len(per_image),
        "per_prompt": [{"editability": p, "editability_per_image": q} for p, q in zip(paper, per_image)],
        "rendered": [results[0]["prompt"] for results, _ in sets],  # as sent to the model
        "first_images": [pils[0] for _, pils in sets],  # one per prompt, for grids
    }


def scores_only(row: dict) -> dict:
    return {k: row[k] for k in ("reconstruction", "editability", "editability_per_image")}


def check_templates(prompts: list[str]) -> list[str]:
    prompts = list(prompts)
    if not prompts:
        raise UserError("no edit prompts given; give at least one prompt with {} for the token")
    for p in prompts:
        if "{}" not in p:
            raise UserError(f"prompt {p[:40]!r} has no {{}}; mark where the token goes")
    return prompts


# --- Table 1 ---------------------------------------------------------------------------------------


def evaluate(model, library, concept_name: str, run_id: str | None = None, step: int | None = None,
             images: int = 16, prompts_file: os.PathLike | str | None = None, clip: str = "ViT-B-32",
             clip_weights: os.PathLike | str | None = None, seed: int = 0, progress=None, cancelled=None, *,
             sample_steps: int = 25, guidance: float = 7.5, batch_size: int | None = None) -> dict:
    """Table 1 for one embedding (a run's final one, or a checkpoint), kept in `<run>/eval/<id>/`."""
    if images < 1:
        raise UserError("--images must be at least 1")
    concept = library.get(concept_name)
    used = load_used(concept, run_id, step, option="run-step")  # the run and step exist, before any work
    prompts = load_prompts(prompts_file) if prompts_file else edit_prompts(concept.property, model.info.spec)
    clip_model = load_clip(clip, clip_weights, model.device)
    train_embs = clip_model.images(training_images(concept))
    eval_id = timestamp_id()
    eval_dir = concept.runs_dir / used.run / "eval" / eval_id
    rows = {}
    for k, (label, ref) in enumerate((("SD", None), ("SD+TI", used.ref))):
        rows[label] = measure(
            model, library, concept, ref, prompts, clip_model, train_embs,
            out_dir=eval_dir / "images" / ("sd" if ref is None else "ti"), images=images, seed=seed,
            sample_steps=sample_steps, guidance=guidance, batch_size=batch_size,
            progress=sub_progress(progress, k / 2, 1 / 2), cancelled=cancelled,
        )
    table = {
        "id": eval_id,
        "rows": [{"model": label, **scores_only(row)} for label, row in rows.items()],
        "prompts": prompts,
        "neutral_prompt": neutral_prompt(concept.property),
        "clip_texts": [without_placeholder(p) for p in prompts],
        "per_prompt": [
            {"prompt": p, "written": fill(p, concept.token), "clip_text": without_placeholder(p),
             **{label: row["per_prompt"][i] for label, row in rows.items()}}
            for i, p in enumerate(prompts)
        ],
        "rendered": {label: row["rendered"] for label, row in rows.items()},
        "seeds": list(range(seed, seed + images)),
        "images_per_set": images,
        "train_images": len(concept.images),
        "clip": clip_model.describe(),
        "model": model.info.identity(),
        "generation": {"steps": sample_steps, "guidance": guidance, "sampler": SAMPLER},
        "concept": concept.name,
        "token": concept.token,
        "description": concept.description,
        "run": used.run,
        "step": used.step,
        "final": used.final,
        "embedding_sha256": used.sha256,
        "editability_definition": "paper: cos(mean image embedding, text embedding), mean over prompts",
        "notes": NOTES,
        "paper": {label: {"reconstruction": r, "editability": e} for label, (r, e) in PAPER_TABLE.items()},
    }
    atomic_write_json(eval_dir / "table.json", table)
    atomic_write_text(eval_dir / "table.md", table_markdown(table))
    if progress:
        progress("done", 1.0)
    return {**table, "dir": str(eval_dir), "table_json": str(eval_dir / "table.json"),
            "table_md": str(eval_dir / "table.md")}


def table_markdown(table: dict) -> str:
    step = "final" if table["final"] else f"step {table['step']}"
    lines = [
        f"# Table 1 — {table['concept']} ({table['token']}), run {table['run']}, {step}",
        "",
        "| Model | Reconstruction | Editability | Editability (per image) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for row in table["rows"]:
        lines.append(f"| {row['model']} | {row['reconstruction']:.4f} | {row['editability']:.4f} | "
                     f"{row['editability_per_image']:.4f} |")
    lines += ["", "The study's Table 1, for reference (SD 1.x, its own concepts):", "",
              "| Model | Reconstruction | Editability |", "| --- | ---: | ---: |"]
    for label, (r, e) in PAPER_TABLE.items():
        lines.append(f"| {label} | {r:.4f} | {e:.4f} |")
    lines += ["", "Per edit prompt (editability / per image):", "", "| Prompt | SD | SD+TI |", "| --- | ---: | ---: |"]
    for p in table["per_prompt"]:
        cells = [f"{p[k]['editability']:.4f} / {p[k]['editability_per_image']:.4f}" for k in ("SD", "SD+TI")]
        lines.append(f"| {p['prompt']} | {cells[0]} | {cells[1]} |")
    seeds = table["seeds"]
    lines += [
        "",
        f"- Reconstruction: {table['images_per_set']} images from \"{table['neutral_prompt']}\" against "
        f"{table['train_images']} training images, mean pairwise CLIP cosine.",
        "- Editability (the paper's): cosine between the mean CLIP image embedding of each prompt's "
        f"{table['images_per_set']} images and the prompt's CLIP text embedding, mean over prompts. "
        "Per image: the original TI code's mean of per-image cosines.",
        f"- Note: {table['notes']} (as the original TI code does).",
        f"- SD row: the description \"{table['description']}\" stands where the token would.",
        f"- Seeds {seeds[0]}–{seeds[-1]} for every set; {table['generation']['sampler']}, "
        f"{table['generation']['steps']} steps, CFG {table['generation']['guidance']:g}.",
        f"- CLIP {table['clip']['name']}" + (f" ({table['clip']['weights']})" if table["clip"]["weights"] else "")
        + f"; model {table['model']['spec']} ({table['model']['fingerprint']}).",
        "",
    ]
    return "\n".join(lines)
