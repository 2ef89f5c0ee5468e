"""Every method on one frontier, over seeds: does any of them move the demo's trade-off?

    python -m demo.frontier [--concepts mushroom,halftone] [--seeds 0,1,2,3,4] \
        [--methods none,init-l2,init-l2:0.001,init-l2:0.01,norm,directional,cross,per-layer] \
        [--steps 2000] [--images 16] [--threads 2] [--home DIR] [--no-baseline]

Trains every method at every seed on builtin:demo with the engine's own inversion (members made
by engine.settings.train.sweep_members, the same seeds for every method; plain and per-layer
words in two batches, every concept's runs in one), then measures each run as `tistudio eval`
does (engine.worker.experiments.runs_experiment: the demo judge, the concept's edit prompts,
`--images` images a set with seeds 0..images-1, DPM++ 25 steps, CFG 7.5) beside the SD row.

For each concept it writes demo/logs/frontier-<concept>.json: every run's numbers, each method's
mean and standard error (engine.store.frontier), its paired difference from `none` on the same
seeds, and the issue's bar:

* on mushroom, a method beats `none` by at least 0.02 in one number, more than twice that
  difference's standard error, while losing no more than 0.01 in the other; or it meets the
  original target: reconstruction >= 0.38 with editability >= 0.4915 (mushroom's SD row);
* and on halftone it loses no more than 0.02 of reconstruction against `none`.

Each concept's verdict says the first part on its own numbers (`beats_none`; the target is
mushroom's only), and halftone's says the second (`keeps_reconstruction`); mushroom's `passes`
combines both, as the issue's bar does.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from demo.common import LOGS

SAMPLES = Path(__file__).parent / "samples"
METHODS = "none,init-l2,init-l2:0.001,init-l2:0.01,norm,directional,cross,per-layer"
TARGET = (0.38, 0.4915)  # reconstruction, editability (the SD row's on mushroom)
GAIN, LOSS, HALFTONE_LOSS = 0.02, 0.01, 0.02


def members(methods: list[str], seeds: list[int], steps: int, lr: float) -> list[dict]:
    """Every method at every seed, as a sweep job's members (the engine's own product and parsing)."""
    from engine.settings.train import sweep_members

    return sweep_members({"steps": steps, "lr": lr, "save_every": steps, "preview_every": 0, "probe_every": 0,
                          "dloss_every": 0, "log_every": 100, "seeds": seeds, "regularizes": methods})


def train_all(model, library, plan: dict[str, list[dict]]) -> tuple[dict[str, list[tuple[str, dict]]], float, int]:
    """Train every concept's members not trained yet: plain words in one batch, per-layer words in
    another.  Returns each concept's (run id, params), the seconds it took, and how many it trained."""
    from engine.inversion.train import RunSlot, TrainConfig, train_many
    from engine.settings.train import method_label
    from engine.store.paths import atomic_write_json

    runs, groups, new = {}, {False: [], True: []}, {}
    for name, params in plan.items():
        concept = library.get(name)
        runs[name], new[name] = [], []
        done = trained_runs(concept)
        k = sum(1 for _ in concept.runs_dir.glob("*/")) if concept.runs_dir.exists() else 0
        for p in params:
            if run_key(p) in done:  # trained by an earlier call on this --home: measured again, not retrained
                runs[name].append((done[run_key(p)], {**p, "init": concept.init}))
                continue
            run_id = f"r{k:02d}-s{p['seed']}-{method_label(p).replace(':', '_').replace('+', '_')}"
            k += 1
            config = TrainConfig(token=concept.token, init=concept.init, property=concept.property,
                                 **{key: v for key, v in p.items() if key != "init"})
            groups[config.per_layer].append(RunSlot(config, concept.runs_dir / run_id, concept.images))
            runs[name].append((run_id, {**p, "init": concept.init}))
            new[name].append(runs[name][-1])
    t0 = time.time()
    for slots in groups.values():
        if slots:
            train_many(model, slots)
    seconds = time.time() - t0
    for name in plan:
        concept = library.get(name)
        for run_id, params in new[name]:
            atomic_write_json(concept.runs_dir / run_id / "run.json", {
                "id": run_id, "kind": "train", "concept": name, "status": "done", "created": time.time(),
                "params": params})
    return runs, seconds, sum(len(ids) for ids in new.values())


def run_key(params: dict) -> tuple:
    """What makes two runs the same run: method, seed, steps and learning rate (CPU training is
    deterministic; what else trains in its batch moves the word only in its last bits, 2e-7 at most
    between batches of 2 and 60, README)."""
    from engine.settings.train import method_label

    return method_label(params), params["seed"], params["steps"], params["lr"]


def trained_runs(concept) -> dict[tuple, str]:
    """The finished runs already in this concept's folder, by run_key: a later call with more
    methods or seeds on the same --home trains only what is missing."""
    found = {}
    for path in sorted(concept.runs_dir.glob("*/run.json")) if concept.runs_dir.exists() else []:
        record = json.loads(path.read_text())
        if record.get("status") == "done" and (path.parent / "learned_embeds.safetensors").exists():
            found[run_key(record["params"])] = record["id"]
    return found


def verdict(data: dict, concept: str, halftone: dict | None) -> dict:
    """The issue's bar for each method on this concept (see the module's docstring)."""
    out = {}
    for point in data["points"]:
        method = point["label"]
        if point.get("sd") or method == "none":
            continue
        delta = data["vs_none"].get(method, {})
        r, e = (delta.get(k, [0.0, None, 0]) for k in ("reconstruction", "editability"))
        beats = any(d[0] >= GAIN and d[1] is not None and d[0] > 2 * d[1] and o[0] >= -LOSS
                    for d, o in ((r, e), (e, r)))
        target = concept == "mushroom" and point["reconstruction"] >= TARGET[0] and point["editability"] >= TARGET[1]
        keeps = r[0] >= -HALFTONE_LOSS
        halftone_ok = None
        if halftone is not None:
            h = halftone["vs_none"].get(method, {}).get("reconstruction")
            halftone_ok = h is not None and h[0] >= -HALFTONE_LOSS
        out[method] = {"beats_none": beats, "meets_target": target, "keeps_reconstruction": keeps,
                       "halftone_keeps_reconstruction": halftone_ok,
                       "passes": (beats or target) and halftone_ok is True if concept == "mushroom" else None,
                       "delta_reconstruction": r[:2], "delta_editability": e[:2]}
    return out


def measure(model, library, name: str, runs: list[tuple[str, dict]], images: int, baseline: bool = True) -> dict:
    from engine.settings.train import method_label
    from engine.store.frontier import frontier
    from engine.worker.experiments import runs_experiment

    labels = [f"{method_label(p)} · seed {p['seed']}" for _, p in runs]
    report = runs_experiment(model, library, name, [r for r, _ in runs], labels, images=images, clip="builtin:demo",
                             seed=0, sample_steps=25, guidance=7.5, baseline=baseline)
    rows = [{k: r.get(k) for k in ("label", "model", "method", "seed", "reconstruction", "editability")}
            | {"per_prompt": [p["editability"] for p in r["per_prompt"]]} for r in report["rows"]]
    return {"concept": name, "rows": rows, "frontier": frontier(report["rows"]), "prompts": report["prompts"],
            "clip": report["clip"], "report": report["dir"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.frontier")
    parser.add_argument("--concepts", default="mushroom,halftone")
    parser.add_argument("--methods", default=METHODS)
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--threads", type=int, help="torch's CPU threads (default: torch's own choice)")
    parser.add_argument("--home", type=Path, help="the library to train in (default: a new temporary folder)")
    parser.add_argument("--out", type=Path, help="write every concept's result to this one file, not demo/logs")
    parser.add_argument("--no-baseline", dest="baseline", action="store_false",
                        help="measure the runs only, not the SD row beside them (it depends on no training: "
                             "a check that the runs reproduce demo/logs compares against the SD row there)")
    args = parser.parse_args(argv)
    if not args.baseline and not args.out:
        parser.error("--no-baseline needs --out: the logs in demo/logs keep their SD row")
    import torch

    from engine.sd.models import load_model
    from engine.store.library import Library

    if args.threads:
        torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.concepts.split(",") if n.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    seeds = [int(s) for s in args.seeds.split(",")]
    records = {c["name"]: c for c in json.loads((SAMPLES / "concepts.json").read_text())}
    library = Library(args.home or Path(tempfile.mkdtemp(prefix="frontier-")))
    model = load_model("builtin:demo")
    for name in names:
        record = records[name]
        if library.exists(name):  # a rerun on the same --home: its runs are reused
            continue
        library.add(name, SAMPLES / name, record["init"], property=record["property"],
                    description=record.get("description"))
    plan = {n: members(methods, seeds, args.steps, args.lr) for n in names}
    runs, trained_s, trained_n = train_all(model, library, plan)
    results = {}
    for name in names:
        t0 = time.time()
        results[name] = {**measure(model, library, name, runs[name], args.images, args.baseline),
                         "measure_seconds": time.time() - t0}
    for name in names:
        halftone = results.get("halftone", {}).get("frontier") if name != "halftone" else None
        results[name].update(
            verdict=verdict(results[name]["frontier"], name, halftone), steps=args.steps, lr=args.lr,
            images=args.images,
            seeds=seeds, methods=methods, train_seconds=trained_s, runs_trained=trained_n,
            runs_reused=sum(len(r) for r in runs.values()) - trained_n,
            date=time.strftime("%Y-%m-%d %H:%M"), home=str(library.home))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    else:
        LOGS.mkdir(parents=True, exist_ok=True)
        for name, result in results.items():
            (LOGS / f"frontier-{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    for name, result in results.items():
        print(f"{name}: {len(seeds)} seeds, {args.images} images a set, trained in {trained_s:.0f} s")
        from engine.store.frontier import frontier_lines

        print("\n".join(frontier_lines(result["frontier"])))
        for method, v in result["verdict"].items():
            print(f"  {method:24} passes: {v['passes']}  (beats none {v['beats_none']}, target {v['meets_target']}, "
                  f"keeps reconstruction {v['keeps_reconstruction']}, halftone ok "
                  f"{v['halftone_keeps_reconstruction']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
