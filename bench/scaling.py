"""Throughput on 1 and on N devices, through the real engine: `make bench DEVICES=N`
(`python bench/run.py --devices N`, or this file alone).

Each measure runs on an engine with one worker, then on an engine with N workers
($TISTUDIO_DEVICES), every worker's model warmed first, and is timed from submitting the
jobs to the last one done (the client's wall clock):

  runs   N equal training runs: one after the other on one worker, side by side on N.
         Reported: both times and their ratio (ideal 1/N; the goal on this project's 2-core
         CPU, two one-thread workers: <= 0.65).  On a CPU each repeat also times N plain
         one-thread torch processes at once against one alone (`machine_ratio`): on a shared
         machine the other users' work decides how much parallel room there is, and
         machine_ratio / N (`machine_floor`) is the best ratio any scheduler could reach then.
  sweep  a sweep of K members (default 2N): whole on one worker, split into N batched groups.
         Reported: run-steps/s (members x steps / seconds) on each, and the speedup
         (ideal N; the goal on a GPU box: >= 0.9 N).

On CUDA: builtin:sd15-arch (SD 1.5's shapes, random weights) at 512 px, fp16, on cuda:0
then cuda:0..N-1.  On CPU: builtin:tiny, each worker one thread (OMP_NUM_THREADS=1) so that
N workers on N cores compare with one worker on one core.  The JSON goes to
OUT/scaling-<device>-<date>-<HHMM>.json; a summary is printed.  The machine's load average
is recorded with it: on a shared machine other work slows the side-by-side runs most.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODELS = {"cuda": "builtin:sd15-arch", "cpu": "builtin:tiny"}
STEPS = {"cuda": 200, "cpu": 100}
RUNS_GOAL_CPU = 0.65  # two one-thread workers vs one, on two cores
SWEEP_GOAL_GPU = 0.9  # x N


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=2, help="N: workers to compare with one (default 2)")
    parser.add_argument("--steps", type=int, help="training steps per run (GPU 200, CPU 100)")
    parser.add_argument("--members", type=int, help="members of the sweep (default 2N)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="folder for the JSON")
    parser.add_argument("--only", choices=("runs", "sweep"), help="one measure only")
    parser.add_argument("--repeat", type=int, default=3, help="times each measure alternates between the engines "
                        "(the median is reported; default 3)")
    args = parser.parse_args(argv)
    if args.devices < 2:
        parser.error("--devices must be 2 or more (it is compared with one)")
    return args


def device_list(n: int) -> tuple[str, list[str]]:
    """("cuda" | "cpu", the N devices): the first N GPUs, else N CPU workers."""
    from engine.devices.pool import auto_devices

    found = auto_devices()
    if found[0].startswith("cuda"):
        if len(found) < n:
            raise SystemExit(f"bench: {n} devices asked for, {len(found)} GPU(s) visible")
        return "cuda", found[:n]
    return "cpu", ["cpu"] * n


class Engine:
    """An engine on `devices` in `home`, for the time of a `with` block."""

    def __init__(self, home: Path, devices: list[str], env: dict):
        self.home, self.devices, self.env = home, devices, env

    def __enter__(self):
        os.environ.update(self.env, TISTUDIO_DEVICES=",".join(self.devices))
        from engine.wire.client import call

        status = call("status", device=False, home=self.home)
        assert [w["device"] for w in status["workers"]] == self.devices, status["workers"]
        return self

    def __exit__(self, *exc):
        from engine.wire.client import call

        call("stop", force=True, home=self.home)

    def timed(self, jobs: list[tuple[str, dict]]) -> tuple[float, list[str]]:
        """Submit every job at once; seconds until the last is done, and their run ids."""
        return asyncio.run(self._timed(jobs))

    async def _timed(self, jobs: list[tuple[str, dict]]) -> tuple[float, list[str]]:
        from engine.wire.client import EngineClient

        client = await EngineClient(self.home).connect()
        try:
            start = time.perf_counter()
            ids = [await client.submit(kind, concept="bench", params=params) for kind, params in jobs]
            statuses = await asyncio.gather(*(client.wait(r) for r in ids))
            seconds = time.perf_counter() - start
        finally:
            await client.close()
        if set(statuses) != {"done"}:
            raise SystemExit(f"bench: jobs ended {statuses}; see {self.home / 'engine' / 'engine.log'}")
        return seconds, ids


def train_params(model: str, steps: int, seed: int, kind: str) -> dict:
    params = {"model": model, "steps": steps, "save_every": steps, "preview_every": 0, "log_every": 10,
              "seed": seed, "keep_checkpoints": 1}
    if kind == "cuda":
        params["precision"] = "fp16"
    return params


def measure(args: argparse.Namespace) -> dict:
    kind, devices = device_list(args.devices)
    n = len(devices)
    model, steps = MODELS[kind], args.steps or STEPS[kind]
    members = args.members or 2 * n
    env = {"TISTUDIO_ENGINE_IDLE": "600", "HF_HUB_OFFLINE": "1", "TISTUDIO_RAY_ADDRESS": "off"}
    if kind == "cpu":
        env["OMP_NUM_THREADS"] = "1"
    homes = [Path(tempfile.mkdtemp(prefix="tis-bench-")) for _ in range(2)]
    result = {"bench": "scaling", "kind": kind, "devices": devices, "model": model, "steps": steps,
              "repeat": args.repeat, "date": dt.date.today().isoformat(),
              "load_average_before": list(os.getloadavg())}
    warm = lambda count: [("train", train_params(model, 2, 100 + k, kind)) for k in range(count)]  # noqa: E731
    runs = [("train", train_params(model, steps, k, kind)) for k in range(n)]
    sweep = [("sweep", {**train_params(model, steps, 0, kind), "seeds": list(range(members))})]
    try:
        for home in homes:
            _add_concept(home)
        # Both engines stay up and warm; the measures alternate between them, so a change in the
        # machine's other load falls on both alike.
        with Engine(homes[0], [devices[0]], env) as one, Engine(homes[1], devices, env) as many:
            one.timed(warm(1))
            many.timed(warm(n))
            if args.only in (None, "runs"):
                pairs, machine = [], []
                for _ in range(args.repeat):
                    pairs.append((one.timed(runs)[0], many.timed(runs)))
                    if kind == "cpu":
                        machine.append(machine_ratio(n))
                ratios = [m[0] / a for a, m in pairs]
                best = min(range(len(pairs)), key=lambda i: ratios[i])
                result["runs"] = {"runs": n, "one_worker_s": [round(a, 2) for a, _ in pairs],
                                  "n_workers_s": [round(m[0], 2) for _, m in pairs],
                                  "ratios": [round(r, 3) for r in ratios], "ratio": round(_median(ratios), 3),
                                  "best_ratio": round(ratios[best], 3), "ideal": round(1 / n, 3),
                                  "goal": RUNS_GOAL_CPU if kind == "cpu" else None,
                                  "overlap_s": round(_overlap(homes[1], pairs[best][1][1]), 2)}
                if machine:  # what the machine allowed at the time, whoever schedules the work
                    result["runs"]["machine_ratios"] = [round(r, 3) for r in machine]
                    result["runs"]["machine_ratio"] = round(_median(machine), 3)
                    # The best `ratio` the CPU allowed: N at once took machine_ratio x one alone, so N
                    # runs side by side take machine_ratio / N of N one after the other.
                    result["runs"]["machine_floor"] = round(_median(machine) / n, 3)
            if args.only in (None, "sweep"):
                pairs = [(one.timed(sweep)[0], many.timed(sweep)[0]) for _ in range(args.repeat)]
                speedups = [a / m for a, m in pairs]
                whole, split = (_median([p[i] for p in pairs]) for i in (0, 1))
                result["sweep"] = {"members": members, "groups": n, "one_worker_s": [round(a, 2) for a, _ in pairs],
                                   "n_workers_s": [round(m, 2) for _, m in pairs],
                                   "one_worker_run_steps_per_s": round(members * steps / whole, 2),
                                   "n_workers_run_steps_per_s": round(members * steps / split, 2),
                                   "speedups": [round(x, 3) for x in speedups], "speedup": round(_median(speedups), 3),
                                   "ideal": n, "goal": round(SWEEP_GOAL_GPU * n, 2) if kind == "cuda" else None}
    finally:
        for home in homes:
            shutil.rmtree(home, ignore_errors=True)
    result["load_average_after"] = list(os.getloadavg())
    return result


MACHINE_WORK = """
import time, torch
torch.set_num_threads(1)
x = torch.randn(256, 256)
for _ in range(1500):
    x = torch.tanh(x @ x.T * 0.001)
"""


def machine_ratio(n: int) -> float:
    """N one-thread processes of pure torch compute at once, against one alone (the ratio of
    their wall times; torch's import excluded): how much parallel room the CPU has right now,
    the floor for the engine's `runs` ratio.  1/N on an idle machine, near 1 when other work
    already fills the other cores."""
    import subprocess

    code = "import torch, time, sys\nt0 = time.perf_counter()\n" + MACHINE_WORK + \
           "\nprint(time.perf_counter() - t0)"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def batch(count: int) -> float:
        procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
                 for _ in range(count)]
        return max(float(p.communicate()[0].strip().splitlines()[-1]) for p in procs)

    alone = batch(1)
    return batch(n) / alone


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _add_concept(home: Path) -> None:
    from bench.measure import synthetic_images
    from engine.sd.models import load_tokenizer
    from engine.store.library import Library

    _, _paths = synthetic_images(4, 96, home / "images")
    Library(home).add("bench", home / "images", "cat", tokenizer=load_tokenizer())


def _overlap(home: Path, ids: list[str]) -> float:
    """Seconds during which every run was running at once (from run.json's started/finished)."""
    from engine.store import runs as jobs

    records = [jobs.load_run(jobs.find_run(home, r)) for r in ids]
    return max(0.0, min(r["finished"] for r in records) - max(r["started"] for r in records))


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def device_name(kind: str) -> str:
    if kind != "cuda":
        return "cpu"
    from engine.devices.probe import all_gpus

    gpus = all_gpus()
    return gpus[0].name if gpus else "cuda"


def summary(result: dict) -> str:
    lines = [f"devices: {', '.join(result['devices'])} ({result['model']}, {result['steps']} steps per run, "
             f"median of {result['repeat']}; load average {result['load_average_before'][0]:.1f})"]
    runs = result.get("runs")
    if runs:
        goal = f"; goal <= {runs['goal']}" if runs.get("goal") else ""
        lines.append(f"runs   {runs['runs']} equal runs: one worker, one after the other {runs['one_worker_s']} s; "
                     f"{runs['runs']} workers side by side {runs['n_workers_s']} s -> {runs['ratio']:.2f}x the time "
                     f"(best {runs['best_ratio']:.2f}; ideal {runs['ideal']}{goal})")
        if "machine_ratio" in runs:
            lines.append(f"       the machine meanwhile: {runs['runs']} one-thread compute processes at once took "
                         f"{runs['machine_ratio']:.2f}x one alone ({runs['machine_ratios']}), so no scheduler could "
                         f"beat {runs['machine_floor']:.2f}x then")
    sweep = result.get("sweep")
    if sweep:
        goal = f"; goal >= {sweep['goal']}" if sweep.get("goal") else ""
        lines.append(f"sweep  {sweep['members']} members: one worker {sweep['one_worker_run_steps_per_s']:.1f} "
                     f"run-steps/s, {sweep['groups']} workers {sweep['n_workers_run_steps_per_s']:.1f} run-steps/s "
                     f"-> {sweep['speedup']:.2f}x (ideal {sweep['ideal']}{goal})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = measure(args)
    result["device_name"] = device_name(result["kind"])
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"scaling-{slug(result['device_name'])}-{dt.datetime.now():%Y-%m-%d-%H%M}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(summary(result))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
