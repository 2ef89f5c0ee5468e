"""Which regulariser keeps a demo word editable, and at what strength?  Measured, not guessed.

    python -m demo.regularize_sweep --concept mushroom \
        --configs none,init-l2:0.5,init-l2:2,norm:1,directional [--steps 2000] [--images 16]

Trains one run per config on builtin:demo with the engine's own inversion, all of them
batched into one UNet call per step (engine.train.train_many), then measures each run as
`tistudio eval` does (engine.experiments.runs_experiment: the demo judge, its edit
prompts, 16 images per set, seeds 0-15, DPM++ 25 steps, CFG 7.5), plus the SD row.
The table goes to stdout and demo/logs/regularize-<concept>.json; what it found picks
engine.regularize.DEFAULT_WEIGHTS and the README's table.
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


def sweep(concept_name: str, configs: list[tuple[str, float]], steps: int, images: int, lr: float) -> dict:
    from engine.experiments import runs_experiment
    from engine.library import Library
    from engine.metrics import evaluate
    from engine.models import load_model
    from engine.paths import atomic_write_json
    from engine.train import RunSlot, TrainConfig, train_many

    record = next(c for c in json.loads((SAMPLES / "concepts.json").read_text()) if c["name"] == concept_name)
    home = Path(tempfile.mkdtemp(prefix="regsweep-"))
    library = Library(home)
    concept = library.add(concept_name, SAMPLES / concept_name, record["init"], property=record["property"],
                          description=record.get("description"))
    model = load_model("builtin:demo")
    run_ids = [f"r{k}-{m}-{w:g}" for k, (m, w) in enumerate(configs)]
    slots = [RunSlot(TrainConfig(token=concept.token, init=concept.init, property=concept.property, steps=steps,
                                 lr=lr, regularize=m, reg_weight=w, save_every=steps, preview_every=0),
                     concept.runs_dir / r, concept.images) for r, (m, w) in zip(run_ids, configs)]
    t0 = time.time()
    train_many(model, slots)
    trained_s = time.time() - t0
    for r in run_ids:
        atomic_write_json(concept.runs_dir / r / "run.json",
                          {"id": r, "kind": "train", "status": "done", "created": time.time(), "steps": steps})
    labels = [f"{m}" + (f" w={w:g}" if w else "") for m, w in configs]
    common = dict(images=images, clip="builtin:demo", seed=0, sample_steps=25, guidance=7.5)
    report = runs_experiment(model, library, concept_name, run_ids, labels, **common)
    sd = next(r for r in evaluate(model, library, concept_name, run_id=run_ids[0], **common)["rows"]
              if r["model"] == "SD")
    rows = [{"label": "SD", **{k: sd[k] for k in ("reconstruction", "editability")}}]
    rows += [{"label": r["label"], "reconstruction": r["reconstruction"], "editability": r["editability"],
              "per_prompt": [p["editability"] for p in r["per_prompt"]]} for r in report["runs"]]
    return {"concept": concept_name, "steps": steps, "lr": lr, "images": images, "train_seconds": trained_s,
            "rows": rows, "prompts": report["prompts"], "home": str(home)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.regularize_sweep")
    parser.add_argument("--concept", default="mushroom", choices=("mushroom", "halftone"))
    parser.add_argument("--configs", default="none,init-l2,norm,directional")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--images", type=int, default=16)
    args = parser.parse_args(argv)
    result = sweep(args.concept, parse_configs(args.configs), args.steps, args.images, args.lr)
    print(f"{result['concept']}: {result['steps']} steps, trained in {result['train_seconds']:.0f} s")
    print(f"{'':24} reconstruction  editability")
    for row in result["rows"]:
        print(f"{row['label']:24} {row['reconstruction']:14.4f}  {row['editability']:11.4f}")
    LOGS.mkdir(parents=True, exist_ok=True)
    log = LOGS / f"regularize-{args.concept}.json"
    history = json.loads(log.read_text()) if log.exists() else []
    history.append({**result, "configs": args.configs, "date": time.strftime("%Y-%m-%d %H:%M")})
    log.write_text(json.dumps(history, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
