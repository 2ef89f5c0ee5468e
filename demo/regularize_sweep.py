"""Which regulariser keeps a demo word editable, and at what strength?  Measured, not guessed.

    python -m demo.regularize_sweep --concept mushroom[,halftone] \
        --configs none,init-l2:0.003,init-l2:0.01,directional [--steps 2000] [--images 16]
    python -m demo.regularize_sweep --plan mushroom=none,init-l2@16 --plan halftone=none,norm@8 \
        --out results.json [--threads 1] [--home DIR]     # each concept its own configs and images

Trains one run per config (and concept) on builtin:demo with the engine's own inversion, all
of them batched into one UNet call per step (engine.inversion.train.train_many), then measures each run as
`tistudio eval` does (engine.worker.experiments.runs_experiment: the demo judge, its edit
prompts, 16 images per set, seeds 0-15, DPM++ 25 steps, CFG 7.5), plus the SD row.
The table goes to stdout and demo/logs/regularize-<concept>.json; what it found picks
engine.inversion.regularize.DEFAULT_WEIGHTS and the README's table.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from demo.common import LOGS

SAMPLES = Path(__file__).parent / "samples"


def parse_configs(text: str) -> list[tuple[str, float]]:
    """"none,init-l2:0.5,directional" -> [("none", 0.0), ("init-l2", 0.5), ("directional", 0.0)]."""
    configs = []
    for item in text.split(","):
        method, _, weight = item.strip().partition(":")
        configs.append((method, float(weight) if weight else 0.0))
    return configs


def sweep(plan: dict[str, list[tuple[str, float]]], steps: int, images: dict[str, int], lr: float = 5e-4,
          home: Path | None = None) -> dict:
    """{concept: configs} -> {concept: result}.  Every run of every concept trains in one batch
    (one UNet call per step: a run's row is independent of the others), then each concept's runs
    are measured with `images[concept]` images per set, beside its SD row.  The library lives in
    `home` (default: a new temporary folder)."""
    from engine.inversion.train import RunSlot, TrainConfig, train_many
    from engine.sd.models import load_model
    from engine.store.library import Library
    from engine.store.paths import atomic_write_json

    records = {c["name"]: c for c in json.loads((SAMPLES / "concepts.json").read_text())}
    library = Library(home or Path(tempfile.mkdtemp(prefix="regsweep-")))
    model = load_model("builtin:demo")
    runs, slots = {}, []
    for name, configs in plan.items():
        record = records[name]
        concept = library.add(name, SAMPLES / name, record["init"], property=record["property"],
                              description=record.get("description"))
        runs[name] = [(f"r{k}-{m}-{w:g}", m, w) for k, (m, w) in enumerate(configs)]
        slots += [RunSlot(TrainConfig(token=concept.token, init=concept.init, property=concept.property, steps=steps,
                                      lr=lr, regularize=m, reg_weight=w, save_every=steps, preview_every=0,
                                      probe_every=0, dloss_every=0),  # it measures each run itself
                          concept.runs_dir / r, concept.images) for r, m, w in runs[name]]
    t0 = time.time()
    train_many(model, slots)
    trained_s = time.time() - t0
    for slot in slots:
        atomic_write_json(slot.run_dir / "run.json", {"id": slot.run_dir.name, "kind": "train", "status": "done",
                                                      "created": time.time(), "steps": steps})
    return {name: {**measure(model, library, name, runs[name], images[name]), "steps": steps, "lr": lr,
                   "images": images[name], "train_seconds": trained_s, "runs_trained_together": len(slots),
                   "home": str(library.home)}
            for name in plan}


def measure(model, library, name: str, runs: list[tuple[str, str, float]], images: int) -> dict:
    """Table 1 of each run (the demo judge, the concept's edit prompts), and the SD row."""
    from engine.worker.experiments import runs_experiment

    labels = [f"{m}" + (f" w={w:g}" if w else "") for _, m, w in runs]
    report = runs_experiment(model, library, name, [r for r, _, _ in runs], labels, images=images,
                             clip="builtin:demo", seed=0, sample_steps=25, guidance=7.5, baseline=True)
    methods = ["SD"] + [m for _, m, _ in runs]
    rows = [{"label": r["label"], "method": m, "reconstruction": r["reconstruction"], "editability": r["editability"],
             "per_prompt": [p["editability"] for p in r["per_prompt"]]} for r, m in zip(report["rows"], methods)]
    return {"concept": name, "rows": rows, "prompts": report["prompts"], "clip": report["clip"]}


def parse_plan(items: list[str]) -> tuple[dict[str, list[tuple[str, float]]], dict[str, int]]:
    """["mushroom=none,init-l2@16", ...] -> ({concept: configs}, {concept: images per set})."""
    plan, images = {}, {}
    for item in items:
        name, _, rest = item.partition("=")
        configs, _, count = rest.rpartition("@")
        if not name or not configs or not count.isdigit():
            raise SystemExit(f"--plan {item!r}: write CONCEPT=CONFIGS@IMAGES, e.g. mushroom=none,init-l2@16")
        plan[name.strip()], images[name.strip()] = parse_configs(configs), int(count)
    return plan, images


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.regularize_sweep")
    parser.add_argument("--concept", default="mushroom", help="mushroom, halftone, or both: mushroom,halftone")
    parser.add_argument("--configs", default="none,init-l2,norm,directional")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--plan", action="append", metavar="CONCEPT=CONFIGS@IMAGES",
                        help="instead of --concept/--configs/--images: one concept's configs and images per set")
    parser.add_argument("--out", type=Path, help="write the results here as JSON (not to demo/logs)")
    parser.add_argument("--threads", type=int, help="torch's CPU threads (default: torch's own choice)")
    parser.add_argument("--home", type=Path, help="the library to train in (default: a new temporary folder)")
    args = parser.parse_args(argv)
    if args.plan:
        plan, images = parse_plan(args.plan)
    else:
        names = [n.strip() for n in args.concept.split(",")]
        plan, images = {n: parse_configs(args.configs) for n in names}, dict.fromkeys(names, args.images)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    results = sweep(plan, args.steps, images, args.lr, home=args.home)
    if args.out:
        from engine.store.paths import atomic_write_json

        atomic_write_json(args.out, results)
        return 0
    LOGS.mkdir(parents=True, exist_ok=True)
    for name, result in results.items():
        print(f"{name}: {result['steps']} steps, trained in {result['train_seconds']:.0f} s")
        print(f"{'':24} reconstruction  editability")
        for row in result["rows"]:
            print(f"{row['label']:24} {row['reconstruction']:14.4f}  {row['editability']:11.4f}")
        log = LOGS / f"regularize-{name}.json"
        history = json.loads(log.read_text()) if log.exists() else []
        history.append({**result, "configs": args.configs, "date": time.strftime("%Y-%m-%d %H:%M")})
        log.write_text(json.dumps(history, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
