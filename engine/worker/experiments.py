"""The study's ablations (section 4) and prompt batches (section 5), as reports on disk.

* steps  one run, every saved checkpoint: a grid (prompts x checkpoints) and the
         reconstruction / editability curve over steps;
* init   one run per initializer word (Building vs Tower, Fish vs Dragon);
* seeds  one run per training seed;
* regularize  the trade-off: one run per method (none, init-l2:W, norm, directional, cross,
         per-layer, or parts joined with +) and, with --seeds, per training seed, with the SD row:
         Table 1 for each, and the frontier (engine.store.frontier: each method's mean point
         with its standard errors, SD's point, the Pareto front; frontier.png);
* runs   finished runs side by side (e.g. the members of a sweep job);
* synthesis  section 5: the learned word in new scenes (objects) or on new subjects (styles).

init, seeds and regularize run as an engine job (`engine.worker.job_kinds.handle_experiment`): the
job trains its member runs together (`engine.worker.sweeps.train_sweep`: K runs in one
UNet call, each ending where its solo run would, resumable), then measures each
run the way `metrics.evaluate` does.  Reports live in
`<concept>/experiments/<kind>-<id>/`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from engine.errors import UserError
from engine.inversion.dino import prepare_dino
from engine.inversion.judge import prepare_judge
from engine.inversion.metrics import (
    NOTES,
    check_templates,
    dino_line,
    judge_line,
    measure_rows,
    scores_only,
    training_paths,
)
from engine.sd.generation import (
    GenerateRequest,
    checkpoint_steps,
    done_runs,
    load_used,
    make_grid,
    read_record,
    save_png,
    sub_progress,
    timestamp_id,
)
from engine.settings.prompts import edit_prompts, fill, neutral_prompt, synthesis_prompts
from engine.settings.train import method_label
from engine.store.frontier import frontier, frontier_lines
from engine.store.paths import atomic_write_json, atomic_write_text, ensure_private_dir
from engine.store.runs import load_run
from engine.worker.frontier_plot import frontier_png, frontier_text
from engine.worker.sweeps import train_sweep


def _experiment_dir(concept, kind: str) -> tuple[str, Path]:
    exp_id = f"{kind}-{timestamp_id()}"
    return exp_id, ensure_private_dir(concept.path / "experiments" / exp_id)


@dataclass(frozen=True)
class Judges:
    """What measures an experiment's images: the CLIP judge, and DINO beside it (--dino) or not."""

    clip: object  # engine.inversion.judge.JudgeSpec
    dino: object | None = None  # engine.inversion.dino.DinoSpec


def _setup(model, library, name, prompts, clip, clip_weights, images, dino=None):
    """What every experiment checks before its first step or image: concept, prompts, training
    images, and a judge (and DINO model) that will load (only checked: built after the last image)."""
    if images < 1:
        raise UserError("--images must be at least 1")
    concept = library.get(name)
    prompts = check_templates(prompts) if prompts is not None else edit_prompts(concept.property, model.info.spec)
    training_paths(concept)
    return concept, prompts, Judges(prepare_judge(clip, clip_weights), prepare_dino(dino))


def _measure_columns(model, library, concept, refs: list[str | None], prompts, judges: Judges, exp_dir: Path,
                     names: list[str], images: int, seed: int, sample_steps: int, guidance: float,
                     batch_size: int, progress, cancelled) -> tuple[list[dict], dict]:
    """Measure each embedding (a --use string; None: SD alone); one result per column of the
    grid, and the judges' description."""
    return measure_rows(
        model, library, concept, refs, prompts, judges.clip, [exp_dir / "images" / folder for folder in names],
        images=images, seed=seed, sample_steps=sample_steps, guidance=guidance, batch_size=batch_size,
        progress=progress, cancelled=cancelled, dino=judges.dino,
    )


def _grid(columns: list[dict], col_labels: list[str], templates: list[str], token: str):
    """Rows are prompts, columns are checkpoints or runs; each cell the first seed's image."""
    rows = len(templates)
    images = [columns[c]["first_images"][r] for r in range(rows) for c in range(len(columns))]
    return make_grid(images, rows, len(columns), row_labels=[fill(t, token) for t in templates],
                     col_labels=col_labels)


def _common(concept, model, clip: dict, prompts, images, seed, sample_steps, guidance) -> dict:
    clip = dict(clip)
    dino = clip.pop("dino", None)  # measure_rows' description of DINO, when it measured
    return {
        "concept": concept.name, "token": concept.token, "model": model.info.identity(),
        "clip": clip, **({"dino": dino} if dino else {}), "neutral_prompt": neutral_prompt(concept.property),
        "prompts": prompts,
        "seeds": list(range(seed, seed + images)), "images_per_set": images,
        "generation": {"steps": sample_steps, "guidance": guidance}, "notes": NOTES,
    }


# --- steps ------------------------------------------------------------------------------------------


def steps_experiment(model, library, name: str, run_id: str | None = None, at: list[int] | None = None,
                     prompts: list[str] | None = None, images: int = 4, clip: str = "ViT-B-32",
                     clip_weights=None, seed: int = 0, sample_steps: int = 25, guidance: float = 7.5,
                     batch_size: int | None = None, progress=None, cancelled=None, dino: str | None = None) -> dict:
    """Reconstruction and editability at each saved checkpoint of one run (section 4.1)."""
    concept = library.get(name)
    if run_id is None:
        runs = done_runs(concept)
        if not runs:
            raise UserError(f"concept {name!r} has no finished run; train it first or pass the run id")
        run_id = runs[-1].id
    run_dir = concept.runs_dir / run_id
    if read_record(run_dir) is None:
        raise UserError(f"concept {name!r} has no run {run_id!r}; `tistudio runs` lists them")
    saved = checkpoint_steps(run_dir)
    steps = sorted(set(at)) if at else saved
    missing = [s for s in steps if s not in saved]
    if missing or not steps:
        raise UserError(f"run {run_id} has no embedding at step(s) {', '.join(map(str, missing)) or 'any'}; "
                        f"saved: {', '.join(map(str, saved)) or 'none'}")
    concept, prompts, judge_spec = _setup(model, library, name, prompts, clip, clip_weights, images, dino)
    exp_id, exp_dir = _experiment_dir(concept, "steps")
    columns, judged_by = _measure_columns(
        model, library, concept, [f"{concept.name}@{run_id}:{s}" for s in steps], prompts, judge_spec,
        exp_dir, [f"step-{s}" for s in steps], images, seed, sample_steps, guidance, batch_size, progress, cancelled,
    )
    points = [{"step": s, **scores_only(c), "per_prompt": c["per_prompt"]} for s, c in zip(steps, columns)]
    curve = {"id": exp_id, "kind": "steps", "run": run_id, "steps": steps, "points": points,
             **_common(concept, model, judged_by, prompts, images, seed, sample_steps, guidance)}
    return _write_report(exp_dir, concept, prompts, columns, [f"step {s}" for s in steps], curve,
                         "curve", "curve.txt", curve_text(points), progress)


def _write_report(exp_dir: Path, concept, prompts: list[str], columns: list[dict], col_labels: list[str],
                  data: dict, name: str, text_name: str, text: str, progress) -> dict:
    """Every report ends the same way: grid.png (prompts x columns), `name`.json, a text
    version, progress at 100%, and the data returned with the paths of what was written
    (keys grid, `name`_json and the text file's name with "_" for ".", e.g. table_md)."""
    templates = [neutral_prompt(concept.property)] + prompts
    save_png(exp_dir / "grid.png", _grid(columns, col_labels, templates, concept.token))
    atomic_write_json(exp_dir / f"{name}.json", data)
    atomic_write_text(exp_dir / text_name, text)
    if progress:
        progress("done", 1.0)
    return {**data, "dir": str(exp_dir), "grid": str(exp_dir / "grid.png"),
            f"{name}_json": str(exp_dir / f"{name}.json"), text_name.replace(".", "_"): str(exp_dir / text_name)}


def curve_text(points: list[dict]) -> str:
    """The curve as terminal text: a plotext chart when plotext is installed, and always a table."""
    table = ["step      reconstruction  editability  editability/image"]
    table += [f"{p['step']:<9} {p['reconstruction']:>14.4f}  {p['editability']:>11.4f}  "
              f"{p['editability_per_image']:>17.4f}" for p in points]
    try:
        import plotext as plt
    except ImportError:
        return "\n".join(table) + "\n"
    plt.clear_figure()
    x = [p["step"] for p in points]
    plt.plot(x, [p["reconstruction"] for p in points], label="reconstruction", marker="braille")
    plt.plot(x, [p["editability"] for p in points], label="editability", marker="braille")
    plt.title("CLIP scores over training steps")
    plt.xlabel("step")
    plt.plotsize(78, 20)
    chart = plt.uncolorize(plt.build())
    plt.clear_figure()
    return chart + "\n\n" + "\n".join(table) + "\n"


# --- init words and seeds: K runs trained together ---------------------------------------------------

SWEEP_AXES = {"init": "inits", "seeds": "seeds", "regularize": "regularizes"}  # kind -> the sweep param it varies
SWEEP_FIXES = {"init": "init", "seeds": "seed", "regularize": "regularize"}  # kind -> the setting each run varies
SWEEP_LABELS = {"init": "init", "seeds": "seed", "regularize": "regularize"}


def _sweep_values(kind: str, values: list) -> list:
    from engine.settings.train import REGULARIZERS, parse_method

    if kind == "regularize":
        values = list(dict.fromkeys(str(v).strip() for v in values)) or list(REGULARIZERS)
        for value in values:
            parse_method(value)  # METHOD or METHOD:WEIGHT
        return values
    values = list(dict.fromkeys(str(v).strip() if kind == "init" else int(v) for v in values))
    if not values or not all(str(v) for v in values):
        raise UserError("give at least one initializer word, e.g. --words building,tower" if kind == "init"
                        else "give at least one seed, e.g. --seeds 0,1")
    return values


def sweep_experiment(ctx, model, library, kind: str, values: list, train: dict | None = None, *,
                     prompts: list[str] | None = None, images: int = 4, clip: str = "ViT-B-32", clip_weights=None,
                     seed: int = 0, sample_steps: int = 25, guidance: float = 7.5, batch_size: int | None = None,
                     progress=None, cancelled=None, seeds: list[int] | None = None, dino: str | None = None) -> dict:
    """One run per initializer word (kind "init", section 4.2), per training seed ("seeds",
    section 4.3) or per regulariser ("regularize"), the other settings shared (`train`),
    trained together as the members of experiment job `ctx`, then measured side by side
    (regularize also measures the SD row, so its table is Table 1 for each method, and its
    frontier).  `seed` is the sampling seed; a training seed is `train["seed"]`, or, for
    regularize, every method at each of `seeds` (one sweep: the members are methods x seeds)."""
    if kind not in SWEEP_AXES:
        raise UserError(f"unknown sweep experiment {kind!r}; choose {', '.join(SWEEP_AXES)}")
    values = _sweep_values(kind, values)
    fixed = {"token", "property", SWEEP_AXES[kind], SWEEP_FIXES[kind]} & set(train or {})
    if fixed:
        raise UserError(f"train options cannot set {', '.join(sorted(fixed))}: the experiment sets them")
    concept, prompts, judge_spec = _setup(model, library, ctx.spec["concept"], prompts, clip, clip_weights, images,
                                          dino)
    # A resumed job keeps its report folder (and its members, found by train_sweep).
    exp_id = load_run(ctx.run_dir).get("experiment") or f"{kind}-{timestamp_id()}"
    ctx.set_progress(experiment=exp_id)
    exp_dir = ensure_private_dir(concept.path / "experiments" / exp_id)
    labels = [f"{SWEEP_LABELS[kind]} {v}" for v in values]
    # Previews and probes are off by default: the grid shows every run side by side, and the
    # experiment measures its runs itself.
    params = {"preview_every": 0, "probe_every": 0, **(train or {}), SWEEP_AXES[kind]: values}
    if seeds and kind == "regularize":  # sweep_members' order: seed by seed, every method at each
        seeds = [int(s) for s in dict.fromkeys(seeds)]
        params["seeds"], labels = seeds, [f"{v} · seed {s}" for s in seeds for v in values]
    training = sub_progress(progress, 0.0, 0.6)

    def on_step(fields: dict) -> None:
        if training:
            training(f"training step {fields['step']}/{fields['steps']}", fields["step"] / fields["steps"])

    members, _ = train_sweep(ctx, model, concept, params, on_step=on_step,
                             extra=[{"experiment": exp_id, "label": label} for label in labels])
    return _report_runs(
        model, library, concept, kind, exp_id, exp_dir, [m.run_id for m in members], labels, prompts, judge_spec,
        images=images, seed=seed, sample_steps=sample_steps, guidance=guidance, batch_size=batch_size,
        progress=sub_progress(progress, 0.6, 0.4), cancelled=cancelled, baseline=kind == "regularize",
    )


def runs_experiment(model, library, name: str, run_ids: list[str], labels: list[str] | None = None, *,
                    prompts: list[str] | None = None, images: int = 4, clip: str = "ViT-B-32", clip_weights=None,
                    seed: int = 0, sample_steps: int = 25, guidance: float = 7.5, batch_size: int | None = None,
                    progress=None, cancelled=None, baseline: bool = False, dino: str | None = None) -> dict:
    """Finished runs of one concept side by side (e.g. the members of a sweep job): grid and table
    (with `baseline`, the SD row first)."""
    concept = library.get(name)
    if not run_ids:
        raise UserError("give at least one run id to compare")
    labels = list(labels) if labels else [f"run {r}" for r in run_ids]
    if len(labels) != len(run_ids):
        raise UserError(f"{len(labels)} labels for {len(run_ids)} runs; give one label per run")
    for run_id in run_ids:
        load_used(concept, run_id)  # each must be a finished run of this concept
    concept, prompts, judge_spec = _setup(model, library, name, prompts, clip, clip_weights, images, dino)
    exp_id, exp_dir = _experiment_dir(concept, "runs")
    return _report_runs(
        model, library, concept, "runs", exp_id, exp_dir, list(run_ids), labels, prompts, judge_spec,
        images=images, seed=seed, sample_steps=sample_steps, guidance=guidance, batch_size=batch_size,
        progress=progress, cancelled=cancelled, baseline=baseline,
    )


def _run_spec(concept, run_id: str) -> dict:
    """The training settings a run recorded (ours write `spec`, jobs write `params`)."""
    record = read_record(concept.runs_dir / run_id) or {}
    spec = record.get("spec") or record.get("params") or {}
    return spec if isinstance(spec, dict) else {}


def _report_runs(model, library, concept, kind: str, exp_id: str, exp_dir: Path, run_ids: list[str],
                 labels: list[str], prompts, judge_spec, *, images, seed, sample_steps, guidance,
                 batch_size, progress, cancelled, baseline: bool = False) -> dict:
    """Measure each run (and, with `baseline`, plain SD first: the same prompts and seeds with the
    concept's description), then write grid.png (prompts x columns), table.json and table.md."""
    refs = ([None] if baseline else []) + [f"{concept.name}@{r}" for r in run_ids]
    columns, judged_by = _measure_columns(
        model, library, concept, refs, prompts, judge_spec, exp_dir,
        (["sd"] if baseline else []) + [f"run-{r}" for r in run_ids], images, seed, sample_steps, guidance,
        batch_size, progress, cancelled,
    )
    sd = columns.pop(0) if baseline else None
    specs = [_run_spec(concept, r) for r in run_ids]
    runs = [
        {"run": r, "label": label, "init": spec.get("init"), "seed": spec.get("seed"),
         "regularize": spec.get("regularize", "none"), "reg_weight": spec.get("reg_weight", 0.0),
         "method": method_label(spec), **scores_only(c), "per_prompt": c["per_prompt"]}
        for r, label, spec, c in zip(run_ids, labels, specs, columns)
    ]
    rows = ([{"label": "SD", "model": "SD", **scores_only(sd), "per_prompt": sd["per_prompt"]}] if sd else [])
    rows += [{"model": "SD+TI", **run} for run in runs]
    varied = ("init", "seed", "token", "regularize", "reg_weight", "init_mode", "cross_weight", "per_layer")
    train = {k: v for k, v in specs[0].items() if k not in varied}
    table = {"id": exp_id, "kind": kind, "rows": rows, "runs": runs, "train": train,
             **_common(concept, model, judged_by, prompts, images, seed, sample_steps, guidance)}
    if kind == "regularize":  # the trade-off: every method's point, SD's, and the front
        table["frontier"] = frontier(rows)
        frontier_png(table["frontier"], exp_dir / "frontier.png")
    return _write_report(exp_dir, concept, prompts, ([sd] if sd else []) + columns,
                         (["SD"] if sd else []) + labels, table, "table", "table.md", sweep_markdown(table), progress)


def sweep_markdown(table: dict) -> str:
    kind = {"init": "initializer word", "seeds": "training seed", "runs": "training run",
            "regularize": "regulariser (the trade-off: every method)"}[table["kind"]]
    dino = table.get("dino")
    lines = [
        f"# {table['concept']} ({table['token']}): effect of the {kind}", "",
        "| Run | | Reconstruction | Editability | Editability (per image) |" + (" DINO recon. |" if dino else ""),
        "| --- | --- | ---: | ---: | ---: |" + (" ---: |" if dino else ""),
    ]
    for r in table.get("rows") or table["runs"]:
        lines.append(f"| {r.get('run', '')} | {r['label']} | {r['reconstruction']:.4f} | {r['editability']:.4f} | "
                     f"{r['editability_per_image']:.4f} |" + (f" {r['dino']:.4f} |" if dino else ""))
    if table.get("frontier"):
        lines += ["", "## The frontier (mean ± standard error over each method's runs; ★ the Pareto front)", "",
                  *frontier_lines(table["frontier"]), "", "```", frontier_text(table["frontier"]), "```",
                  "frontier.png draws the same plane."]
    train = table["train"]
    lines.append("")
    if table["kind"] != "runs":
        lines.append(f"- Training: {train.get('steps')} steps, lr {train.get('lr')}, batch {train.get('batch_size')}; "
                     "runs trained together, each as its solo run would.")
    lines += [
        f"- {table['images_per_set']} images per prompt, seeds {table['seeds'][0]}–{table['seeds'][-1]}; "
        f"grid.png: rows are prompts, columns runs.",
        f"- Note: {table['notes']}.",
        f"- Judge: {judge_line(table['clip'])}.",
        *([f"- DINO reconstruction (DreamBooth's): {dino_line(dino)}."] if dino else []), "",
    ]
    return "\n".join(lines)


# --- section 5: prompt batches -------------------------------------------------------------------


def synthesis_experiment(model, library, name: str, run_id: str | None = None, step: int | None = None, *,
                         images: int = 2, seed: int = 0, sample_steps: int = 25, guidance: float = 7.5,
                         batch_size: int | None = None, prompts: list[str] | None = None, progress=None,
                         cancelled=None) -> dict:
    """Section 5: the learned word in new scenes (objects: text-guided synthesis) or on new
    subjects (styles: style transfer).  SD and SD+TI for each prompt with the same seeds; every
    image keeps its metadata (PNG chunk + JSON sidecar); grid.png rows are prompts, columns SD
    then SD+TI per seed."""
    from engine.sd.generation import generate

    concept = library.get(name)
    used = load_used(concept, run_id, step, option="run-step")
    templates = check_templates(prompts) if prompts else synthesis_prompts(concept.property, model.info.spec)
    exp_id, exp_dir = _experiment_dir(concept, "synthesis")
    pin = f"{concept.name}@{used.run}" + ("" if used.final else f":{used.step}")
    rows, cells = [], []
    for i, template in enumerate(templates):
        request = GenerateRequest(prompt=fill(template, concept.token), n=images, seed=seed, steps=sample_steps,
                                  guidance=guidance, mode="compare", uses=[pin], batch_size=batch_size,
                                  out_dir=ensure_private_dir(exp_dir / "images" / f"prompt-{i}"))
        made = generate(model, library, request, sub_progress(progress, i / len(templates), 1 / len(templates)),
                        cancelled)
        ordered = sorted(made, key=lambda m: (m["mode"] != "sd", m["seed"]))
        cells += [m["path"] for m in ordered]
        rows.append({"prompt": request.prompt, "template": template,
                     "images": [{k: m[k] for k in ("path", "json", "mode", "seed", "prompt")} for m in ordered]})
    from PIL import Image

    col_labels = [f"SD {s}" for s in range(seed, seed + images)] + [f"SD+TI {s}" for s in range(seed, seed + images)]
    grid = make_grid([Image.open(c) for c in cells], len(templates), 2 * images, row_labels=[r["prompt"] for r in rows],
                     col_labels=col_labels)
    save_png(exp_dir / "grid.png", grid)
    report = {"id": exp_id, "kind": "synthesis", "concept": concept.name, "token": concept.token,
              "run": used.run, "step": used.step, "final": used.final, "property": concept.property,
              "prompts": [r["prompt"] for r in rows], "rows": rows, "seeds": list(range(seed, seed + images)),
              "model": model.info.identity(), "generation": {"steps": sample_steps, "guidance": guidance}}
    atomic_write_json(exp_dir / "synthesis.json", report)
    atomic_write_text(exp_dir / "synthesis.md", synthesis_markdown(report))
    if progress:
        progress("done", 1.0)
    return {**report, "dir": str(exp_dir), "grid": str(exp_dir / "grid.png"),
            "synthesis_json": str(exp_dir / "synthesis.json"), "synthesis_md": str(exp_dir / "synthesis.md")}


def synthesis_markdown(report: dict) -> str:
    what = "text-guided synthesis" if report["property"] == "object" else "style transfer"
    lines = [f"# {report['concept']} ({report['token']}): {what} (the study's section 5)", "",
             f"Run {report['run']}" + ("" if report["final"] else f", step {report['step']}") +
             f"; seeds {report['seeds'][0]}–{report['seeds'][-1]}; SD on the left, SD+TI on the right "
             "(grid.png: a row per prompt).", ""]
    lines += [f"- {r['prompt']}" for r in report["rows"]]
    return "\n".join(lines) + "\n"
