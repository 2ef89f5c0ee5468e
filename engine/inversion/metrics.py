"""CLIP scores for a learned word: what it bought (reconstruction) and what it cost (editability).

As in the study (section 6) and Gal et al.:

* reconstruction  mean pairwise cosine between the CLIP image embeddings of
                  images generated from a neutral prompt and of the training images;
* editability     for each edit prompt, the cosine between the MEAN image embedding
                  of its images and the prompt's CLIP text embedding; the mean over
                  prompts (the paper's definition, our default).  The original TI code
                  averages per-image text-image cosines instead: `editability_per_image`.

With `--dino`, a DINO reconstruction column beside CLIP's (engine.inversion.dino: the
DreamBooth metric, mean pairwise cosine of DINO ViT-S/16 CLS features over the same pairs).

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
from engine.inversion.dino import prepare_dino
from engine.inversion.judge import JudgeSpec, judge, prepare_judge
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


def training_paths(concept) -> list:
    """The concept's training images (checked before any work: a concept without images cannot be measured)."""
    if not concept.images:
        raise UserError(f"concept {concept.name!r} has no training images; add some before measuring")
    return list(concept.images)


def training_images(concept) -> list:
    from engine.store.images import load_image

    return [load_image(p).convert("RGB") for p in training_paths(concept)]


GENERATING = 0.95  # the share of a measurement's progress bar that generation takes; the judge has the rest


@dataclass
class ImageSets:
    """One row's images on disk, not yet judged: the reconstruction set, then one set per edit prompt."""

    paths: list[list[str]]
    rendered: list[str]  # each set's prompt as sent to the model
    first_images: list  # each set's first image (PIL), for grids


def generate_sets(model, library, concept, ref: str | None, prompts: list[str], *, out_dir: Path, images: int,
                  seed: int, sample_steps: int = 25, guidance: float = 7.5, batch_size: int | None = None,
                  progress=None, cancelled=None) -> ImageSets:
    """Generate the reconstruction set and one set per edit prompt.

    ref None: SD alone (description for the token); else the --use string of the embedding.
    Every set uses the same seeds, so the SD and SD+TI rows are paired image for image.
    """
    from PIL import Image

    mode = "sd" if ref is None else "ti"
    templates = [neutral_prompt(concept.property)] + list(prompts)
    sets = ImageSets([], [], [])
    for i, template in enumerate(templates):
        request = GenerateRequest(
            prompt=fill(template, concept.token), n=images, seed=seed, steps=sample_steps, guidance=guidance,
            mode=mode, uses=[ref] if ref else [], out_dir=out_dir / ("reconstruction" if i == 0 else f"edit-{i}"),
            batch_size=batch_size,
        )
        set_progress = sub_progress(progress, i / len(templates), 1 / len(templates))
        results = generate(model, library, request, set_progress, cancelled)
        sets.paths.append([r["path"] for r in results])
        sets.rendered.append(results[0]["prompt"])
        with Image.open(results[0]["path"]) as first:
            sets.first_images.append(first.convert("RGB"))
    return sets


def judge_sets(clip, sets: ImageSets, texts: torch.Tensor, train_embs: torch.Tensor) -> dict:
    """One row's scores: its images embedded by the judge against the prompts' text embeddings."""
    embs = [clip.images(paths) for paths in sets.paths]
    paper = editability_paper_per_prompt(embs[1:], texts)
    per_image = editability_per_image_per_prompt(embs[1:], texts)
    return {
        "reconstruction": reconstruction(embs[0], train_embs),
        "editability": sum(paper) / len(paper),
        "editability_per_image": sum(per_image) / len(per_image),
        "per_prompt": [{"editability": p, "editability_per_image": q} for p, q in zip(paper, per_image)],
        "rendered": sets.rendered,
        "first_images": sets.first_images,
    }


def measure_rows(model, library, concept, refs: list[str | None], prompts: list[str], spec: JudgeSpec,
                 out_dirs: list[Path], *, images: int, seed: int, sample_steps: int = 25, guidance: float = 7.5,
                 batch_size: int | None = None, progress=None, cancelled=None, dino=None) -> tuple[list[dict], dict]:
    """Every row's images first (one row per --use string in `refs`, None for SD alone), then the
    judge: built, every set embedded, freed, so it never shares the device with generation (and
    with `dino`, an engine.inversion.dino.DinoSpec, the DINO model after it, the same way).
    Returns the rows' scores and the judge's description (its "dino": DINO's, when measured)."""
    generating = sub_progress(progress, 0.0, GENERATING)
    sets = [
        generate_sets(model, library, concept, ref, prompts, out_dir=out_dir, images=images, seed=seed,
                      sample_steps=sample_steps, guidance=guidance, batch_size=batch_size,
                      progress=sub_progress(generating, k / len(refs), 1 / len(refs)), cancelled=cancelled)
        for k, (ref, out_dir) in enumerate(zip(refs, out_dirs))
    ]
    if progress:
        progress("scoring with CLIP", GENERATING)
    with judge(spec, model.device) as clip:
        train_embs = clip.images(training_images(concept))
        texts = clip.texts([without_placeholder(t) for t in prompts])
        rows = [judge_sets(clip, row, texts, train_embs) for row in sets]
        described = clip.describe()
    if dino is not None:
        described["dino"] = dino_reconstruction(dino, model.device, concept, sets, rows)
    return rows, described


def dino_reconstruction(spec, device, concept, sets: list[ImageSets], rows: list[dict]) -> dict:
    """Each row's DINO reconstruction (its reconstruction set against the training images), into
    the row as "dino"; returns the DINO model's description."""
    from engine.inversion.dino import dino

    with dino(spec, device) as model:
        train_embs = model.images(training_images(concept))
        for row, images in zip(rows, sets):
            row["dino"] = reconstruction(model.images(images.paths[0]), train_embs)
        return model.describe()


def scores_only(row: dict) -> dict:
    keys = ("reconstruction", "editability", "editability_per_image", "dino")
    return {k: row[k] for k in keys if k in row}


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
             sample_steps: int = 25, guidance: float = 7.5, batch_size: int | None = None,
             dino: str | None = None) -> dict:
    """Table 1 for one embedding (a run's final one, or a checkpoint), kept in `<run>/eval/<id>/`."""
    if images < 1:
        raise UserError("--images must be at least 1")
    concept = library.get(concept_name)
    used = load_used(concept, run_id, step, option="run-step")  # the run and step exist, before any work
    prompts = load_prompts(prompts_file) if prompts_file else edit_prompts(concept.property, model.info.spec)
    training_paths(concept)
    spec = prepare_judge(clip, clip_weights)  # a judge that cannot load is refused before any image
    dino_spec = prepare_dino(dino)  # and a DINO model that is not in the cache
    eval_id = timestamp_id()
    eval_dir = concept.runs_dir / used.run / "eval" / eval_id
    measured, described = measure_rows(
        model, library, concept, [None, used.ref], prompts, spec, [eval_dir / "images" / m for m in ("sd", "ti")],
        images=images, seed=seed, sample_steps=sample_steps, guidance=guidance, batch_size=batch_size,
        progress=progress, cancelled=cancelled, dino=dino_spec,
    )
    dino_described = described.pop("dino", None)
    rows = dict(zip(("SD", "SD+TI"), measured))
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
        "clip": described,
        **({"dino": dino_described} if dino_described else {}),
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
    dino = table.get("dino")
    lines = [
        f"# Table 1 — {table['concept']} ({table['token']}), run {table['run']}, {step}",
        "",
        "| Model | Reconstruction | Editability | Editability (per image) |" + (" DINO recon. |" if dino else ""),
        "| --- | ---: | ---: | ---: |" + (" ---: |" if dino else ""),
    ]
    for row in table["rows"]:
        lines.append(f"| {row['model']} | {row['reconstruction']:.4f} | {row['editability']:.4f} | "
                     f"{row['editability_per_image']:.4f} |" + (f" {row['dino']:.4f} |" if dino else ""))
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
        f"- {judge_line(table['clip'])}; model {table['model']['spec']} ({table['model']['fingerprint']}).",
        *([f"- DINO reconstruction (DreamBooth's): {dino_line(dino)}, over the reconstruction set's pairs."]
          if dino else []),
        "",
    ]
    return "\n".join(lines)


def dino_line(dino: dict) -> str:
    """The DINO model as a report says it."""
    return f"{dino['name']}, {dino['feature']}; {dino['preprocess']}"


def judge_line(clip: dict) -> str:
    """The judge as a report says it: name, weights, activation and why (older tables lack the last two)."""
    text = f"CLIP {clip['name']}" + (f" ({clip['weights']})" if clip.get("weights") else "")
    if clip.get("activation"):
        text += f", {clip['activation']}" + (f": {clip['activation_from']}" if clip.get("activation_from") else "")
    return text
