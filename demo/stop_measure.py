"""Does `--stop-when plateau` end a demo word early without losing it?  Measured, not guessed.

    python -m demo.stop_measure [--concepts mushroom,halftone] [--seeds 0,1,2] [--steps 2000] [--images 16]

For each concept and training seed, two runs with the engine's defaults (probes every 500 steps,
the deterministic loss every 25), trained one at a time exactly as a `train` job trains them (its
record and log: engine.worker.sweeps.ContextReporter), each timed alone:

* the full run: `--steps` steps;
* the stopped run: the same with `--stop-when plateau` (DVAR's rule: engine.settings.stopping).

Then Table 1 as `tistudio eval` measures it (the demo judge, the demo's edit prompts, `--images`
images a set, seeds 0.., DPM++ 25 steps, CFG 7.5) for the SD row and, per seed: the stopped run
at its stop step (its final word), the stopped run's best probed step (NAME@RUN:best), and the
full run's final word.  Single demo runs vary a lot from seed to seed, so each stopped run is
compared with its own seed's full run.  The issue's bar, per concept: on average over the seeds,
stopping saves at least 40% of the steps with reconstruction within 0.03 of the full run's.

Results go to demo/logs/stopping.json (rewritten after every run, so a long measurement that is
cut short keeps what it has); the table to stdout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from demo.common import LOGS

SAMPLES = Path(__file__).parent / "samples"
OUT = LOGS / "stopping.json"
BAR_SAVED, BAR_RECON = 0.40, 0.03


def train_job(model, library, concept, params: dict) -> tuple[str, float]:
    """One run as the worker runs a `train` job (run.json, events.jsonl); its id and wall seconds."""
    from engine.inversion.train import train
    from engine.store.runs import create_run, set_status
    from engine.worker.context import JobContext
    from engine.worker.sweeps import ContextReporter, train_config_from

    run_dir = create_run(library.home, {"kind": "train", "concept": concept.name, "params": params})
    ctx = JobContext({"kind": "train", "concept": concept.name, "params": params}, run_dir.name, run_dir,
                     library.home)
    started = time.perf_counter()
    final = train(model, train_config_from(params, concept), run_dir, concept.images, ContextReporter(ctx),
                  description=concept.description)
    seconds = time.perf_counter() - started
    ctx.flush()
    set_status(run_dir, "done", log=ctx.log, embedding=str(final))
    return run_dir.name, seconds


def table1(model, library, concept, refs: list[str | None], images: int, out: Path) -> list[dict]:
    """Each ref's reconstruction and editability (None: the SD row), as `tistudio eval` measures them."""
    from engine.inversion.judge import prepare_judge
    from engine.inversion.metrics import measure_rows
    from engine.settings.prompts import edit_prompts

    prompts = edit_prompts(concept.property, model.info.spec)
    rows, _ = measure_rows(model, library, concept, refs, prompts, prepare_judge("builtin:demo"),
                           [out / f"row-{i}" for i in range(len(refs))], images=images, seed=0, sample_steps=25,
                           guidance=7.5)
    return [{"reconstruction": r["reconstruction"], "editability": r["editability"]} for r in rows]


def measure_concept(model, library, record: dict, seeds: list[int], steps: int, images: int, save) -> dict:
    from engine.store.runs import load_run

    concept = library.add(record["name"], SAMPLES / record["name"], record["init"], property=record["property"],
                          description=record.get("description"))
    result = {"concept": concept.name, "steps": steps, "images": images, "seeds": []}
    for seed in seeds:
        base = {"steps": steps, "seed": seed, "preview_every": 0}
        full, full_s = train_job(model, library, concept, base)
        stopped, stopped_s = train_job(model, library, concept, {**base, "stop_when": "plateau"})
        record_ = load_run(concept.runs_dir / stopped)
        result["seeds"].append({"seed": seed, "full_run": full, "full_seconds": full_s, "stopped_run": stopped,
                                "stopped_seconds": stopped_s, "stopped": record_.get("stopped"),
                                "best": record_.get("best"), "full_best": load_run(concept.runs_dir / full).get("best"),
                                "warnings": record_.get("warnings")})
        save(result)
    refs = [None]
    for s in result["seeds"]:
        best = ":best" if s["best"] else ""  # a run too short for a probe has none: its final word
        refs += [f"{concept.name}@{s['stopped_run']}", f"{concept.name}@{s['stopped_run']}{best}",
                 f"{concept.name}@{s['full_run']}"]
    rows = table1(model, library, concept, refs, images, Path(tempfile.mkdtemp(prefix="stop-measure-")))
    result["sd"] = rows[0]
    for i, s in enumerate(result["seeds"]):
        s["at_stop"], s["at_best"], s["full"] = rows[1 + 3 * i: 4 + 3 * i]
        s["steps_saved"] = 1 - s["stopped"]["step"] / steps
        s["time_saved"] = 1 - s["stopped_seconds"] / s["full_seconds"]
        s["recon_vs_full"] = s["at_stop"]["reconstruction"] - s["full"]["reconstruction"]
        s["best_recon_vs_full"] = s["at_best"]["reconstruction"] - s["full"]["reconstruction"]
    result["mean"] = {key: statistics.fmean(s[key] for s in result["seeds"])
                      for key in ("steps_saved", "time_saved", "recon_vs_full", "best_recon_vs_full")}
    result["bar"] = {"steps_saved_at_least": BAR_SAVED, "recon_within": BAR_RECON,
                     "met": result["mean"]["steps_saved"] >= BAR_SAVED
                     and abs(result["mean"]["recon_vs_full"]) <= BAR_RECON}
    save(result)
    return result


def print_table(result: dict) -> None:
    print(f"\n{result['concept']}: SD {result['sd']['reconstruction']:.4f} / {result['sd']['editability']:.4f}")
    full = f"full {result['steps']}"
    print(f"{'seed':>4} {'stop':>5} {'saved':>6} {'time':>6}  {'at stop':>15}  {'best (step)':>21}  {full:>15}")
    for s in result["seeds"]:
        pair = lambda row: f"{row['reconstruction']:.4f}/{row['editability']:.4f}"  # noqa: E731
        print(f"{s['seed']:>4} {s['stopped']['step']:>5} {s['steps_saved']:>6.0%} {s['time_saved']:>6.0%}  "
              f"{pair(s['at_stop']):>15}  {pair(s['at_best']) + ' (' + str((s['best'] or {}).get('step')) + ')':>21}  "
              f"{pair(s['full']):>15}")
    m = result["mean"]
    print(f"mean: {m['steps_saved']:.0%} of the steps saved, {m['time_saved']:.0%} of the time; reconstruction at the "
          f"stop {m['recon_vs_full']:+.4f} against the full run (at the best step {m['best_recon_vs_full']:+.4f}); "
          f"bar {'met' if result['bar']['met'] else 'NOT met'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.stop_measure")
    parser.add_argument("--concepts", default="mushroom,halftone")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--threads", type=int, help="torch's CPU threads (default: torch's own choice)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    import torch

    from engine.sd.models import load_model
    from engine.store.library import Library
    from engine.store.paths import atomic_write_json

    if args.threads:
        torch.set_num_threads(args.threads)
    records = {c["name"]: c for c in json.loads((SAMPLES / "concepts.json").read_text())}
    library = Library(Path(tempfile.mkdtemp(prefix="stop-measure-home-")))
    model = load_model("builtin:demo")
    results: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "threads": torch.get_num_threads(), "concepts": {}}

    def save(result: dict) -> None:
        results["concepts"][result["concept"]] = result
        atomic_write_json(args.out, results)

    for name in [n.strip() for n in args.concepts.split(",")]:
        print_table(measure_concept(model, library, records[name], [int(s) for s in args.seeds.split(",")],
                                    args.steps, args.images, save))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
