"""`make bench`: every benchmark variant, each in its own subprocess under its own time limit.

The variants (bench/variants.py) run in plan order, cheap first and torch.compile last.
Each one's result is written as one JSON line the moment it ends, to
OUT/<device>-<date>-<HHMM>.jsonl (the children's output goes to the .log beside it).
A variant that fails or runs out of time is recorded with its error and the rest go on;
one whose model spec the engine does not know is recorded as skipped.

On CUDA: builtin:sd15-arch (SD 1.5's shapes, random weights) at 512 px, fp16, batch 1,
within a 465 s budget.  On CPU: builtin:tiny at 64 px, fp32 (ratios only).
`--devices N` measures something else instead: throughput through the real engine on one
worker and on N (bench/scaling.py; `make bench DEVICES=N`).
Standard library only: torch is imported by the children (bench/measure.py) alone.
Exit status: 0 when every variant that ran succeeded, 1 otherwise, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.variants import CUDA_BUDGET_S, MODELS, Variant, select  # noqa: E402 (after the path set-up)

MEASURE = ROOT / "bench" / "measure.py"
MIN_SLOT_S = 20  # a variant is not started with less of the budget left than this
ERROR_TAIL_LINES = 15

# Settings per device kind; the command line overrides any of them.
DEFAULTS = {
    "cuda": {"steps": 100, "warmup": 5, "gen_images": 16, "eval_images": 16, "sample_steps": 25,
             "clip": "random:ViT-B-32", "budget": CUDA_BUDGET_S},
    "cpu": {"steps": 40, "warmup": 5, "gen_images": 16, "eval_images": 16, "sample_steps": 25,
            "clip": "builtin:tiny", "budget": 0},
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results",
                        help="folder for the .jsonl results and the .log (default bench/results)")
    parser.add_argument("--only", help="comma list of variants to run (default: all)")
    parser.add_argument("--skip", help="comma list of variants to leave out")
    parser.add_argument("--steps", type=int, help="timed steps per variant (GPU 100, CPU 40)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (5)")
    parser.add_argument("--gen-images", type=int, help="images in the generation timing (16)")
    parser.add_argument("--eval-images", type=int, help="images per set in the Table-1 timing (16)")
    parser.add_argument("--sample-steps", type=int, help="sampler steps for generation and Table 1 (25)")
    parser.add_argument("--clip", help="Table-1 CLIP: random:ARCH (open_clip architecture, random weights; "
                        "GPU default random:ViT-B-32) or builtin:tiny (CPU default)")
    parser.add_argument("--budget", type=float, help="seconds for the whole run, 0 for none "
                        f"(GPU {CUDA_BUDGET_S}, CPU none); variants that no longer fit are skipped")
    parser.add_argument("--timeout", type=float, help="caps every variant's own time limit (seconds)")
    parser.add_argument("--devices", type=int, metavar="N",
                        help="instead of the variants: equal runs and a sweep on 1 worker and on N "
                             "(bench/scaling.py), through the engine")
    args = parser.parse_args(argv)
    try:
        args.variants = select(args.only, args.skip)
    except ValueError as exc:
        parser.error(str(exc))
    return args


# --- one line of results -----------------------------------------------------------------------


class Results:
    """The .jsonl of this session: one line per variant, flushed to disk as each one ends."""

    def __init__(self, out: Path, device_slug: str):
        out.mkdir(parents=True, exist_ok=True)
        stem = f"{device_slug}-{dt.datetime.now():%Y-%m-%d-%H%M}"
        self.path = out / f"{stem}.jsonl"
        self.log_path = out / f"{stem}.log"
        self.path.write_text("")
        self.log_path.write_text("")
        self.lines: dict[str, dict] = {}

    def write(self, line: dict) -> None:
        with self.path.open("a") as fh:
            fh.write(json.dumps(line) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        if "variant" in line:
            self.lines[line["variant"]] = line


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def add_ratio(variant: Variant, line: dict, ours: dict | None) -> None:
    """speedup = ours / the reference; vs_ours = this variant's (run-)steps/s / ours."""
    if not variant.ratio or line.get("status") != "ok" or not ours or ours.get("status") != "ok":
        return
    rate = line.get("run_steps_per_s") or line.get("steps_per_s")
    if variant.ratio == "speedup":
        line["speedup"] = ours["steps_per_s"] / line["steps_per_s"]
    elif rate:
        line["vs_ours"] = rate / ours["steps_per_s"]


# --- the children ------------------------------------------------------------------------------


def child_env(session_dir: Path) -> dict:
    """The children's environment: nothing downloaded, nothing of the user's data touched."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TISTUDIO_HOME", str(session_dir / "home"))
    env.setdefault("TISTUDIO_CACHE", str(session_dir / "cache"))  # derived tokenizer, shared by the children
    (session_dir / "tmp").mkdir(exist_ok=True)
    env["TMPDIR"] = str(session_dir / "tmp")
    return env


def run_child(cmd: list[str], env: dict, log, timeout: float | None) -> tuple[int | None, float]:
    """(exit code or None on timeout, seconds).  Its whole process group goes when it ends:
    inductor's compile workers must not outlive a killed variant."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        code = None
    except BaseException:
        _kill_group(proc)
        raise
    _kill_group(proc)
    return code, time.perf_counter() - t0


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def probe(env: dict, log) -> dict:
    """The child's view of torch, the libraries and the device (one JSON line)."""
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.run([sys.executable, str(MEASURE), "--probe"], stdout=out, stderr=log, env=env, cwd=ROOT,
                              timeout=300)
        out.seek(0)
        text = out.read()
    if proc.returncode != 0:
        raise RuntimeError("the probe (python bench/measure.py --probe) failed: torch does not import here; "
                           "see the log")
    return json.loads(text.strip().splitlines()[-1])


def error_tail(log_path: Path, start: int) -> str:
    """The end of what one child printed: its traceback, when it failed."""
    with log_path.open("rb") as fh:
        fh.seek(start)
        lines = fh.read().decode("utf-8", "replace").strip().splitlines()
    return "\n".join(lines[-ERROR_TAIL_LINES:])


def exception_text(tail: str) -> str:
    """The exception a traceback ends with (its message may span lines), on one line."""
    lines = tail.splitlines()
    starts = [i for i, text in enumerate(lines) if text.startswith("Traceback (most recent call last)")]
    after = lines[starts[-1] + 1:] if starts else lines
    first = next((i for i, text in enumerate(after) if text and not text[0].isspace()), None)
    text = " ".join(t.strip() for t in after[first:]) if first is not None else (lines[-1] if lines else "")
    return text[:500]


def spec_available(spec: str) -> bool:
    """Whether the engine knows this model spec (read from configs alone, no torch)."""
    from engine.errors import UserError
    from engine.sd.models import model_info

    try:
        model_info(spec)
    except UserError:  # NotSupportedError included
        return False
    return True


def run_variant(variant: Variant, kind: str, settings: dict, args, results: Results, env: dict,
                session_dir: Path, deadline: float | None) -> dict:
    spec = MODELS[variant.model][kind]
    line = {"variant": variant.name, "what": variant.what, "model": spec}
    if not spec_available(spec):
        return {**line, "status": "skipped", "ok": False, "reason": f"spec not available: {spec}"}
    timeout = variant.timeout_s if kind == "cuda" else variant.cpu_timeout_s
    if args.timeout:
        timeout = min(timeout, args.timeout)
    if deadline is not None:
        left = deadline - time.monotonic()
        if left < MIN_SLOT_S:
            return {**line, "status": "skipped", "ok": False,
                    "reason": f"time budget spent ({settings['budget']:.0f} s; "
                              f"raise --budget or run --only {variant.name})"}
        timeout = min(timeout, left)
    result_file, partial_file = session_dir / f"{variant.name}.json", session_dir / f"{variant.name}.partial.json"
    cmd = [sys.executable, str(MEASURE), variant.name, "--model", spec, "--result", str(result_file),
           "--partial", str(partial_file), *(f"--{k.replace('_', '-')}={v}" for k, v in settings.items()
                                             if k != "budget")]
    # fresh compile caches per variant: a first warm-up is a cold compile, whatever ran before
    caches = session_dir / variant.name
    env = {**env, "TORCHINDUCTOR_CACHE_DIR": str(caches / "inductor"), "TRITON_CACHE_DIR": str(caches / "triton")}
    with results.log_path.open("a") as log:
        log.write(f"\n===== {variant.name}: {' '.join(cmd)}\n")
        log.flush()
        start = log.tell()
        code, wall = run_child(cmd, env, log, timeout)
    line["wall_s"] = round(wall, 2)
    if partial_file.exists():
        line.update(json.loads(partial_file.read_text()))
    if code == 0 and result_file.exists():
        return {**line, **json.loads(result_file.read_text()), "status": "ok", "ok": True}
    if code is None:
        return {**line, "status": "timeout", "ok": False, "error": f"timed out after {timeout:.0f} s (killed)",
                "output_tail": error_tail(results.log_path, start)}
    tail = error_tail(results.log_path, start)
    return {**line, "status": "error", "ok": False, "error": exception_text(tail) or f"exit status {code}",
            "exit_status": code, "output_tail": tail}


def summary_line(line: dict) -> str:
    name = f"{line['variant']:24}"
    if line["status"] != "ok":
        return f"{name} {line['status'].upper()}: {line.get('error') or line.get('reason')}"
    parts = []
    if "steps_per_s" in line:
        parts.append(f"{line['steps_per_s']:8.2f} steps/s {line['ms_per_step']:8.1f} ms/step")
    if line.get("runs", 1) > 1:
        parts.append(f"{line['run_steps_per_s']:.1f} run-steps/s")
    if "images_per_s" in line:
        parts.append(f"{line['images']} images x {line['sample_steps']} steps: {line['images_per_s']:.2f} images/s")
    if "sets" in line:
        parts.append(f"{line['images']} images + CLIP ({line['clip']}): {line['seconds']:.1f} s")
    if "ours_syncs_per_step" in line:
        parts.append(f"syncs/step ours {line['ours_syncs_per_step']}, reference {line['reference_syncs_per_step']}"
                     + (f" ({line['note']})" if line.get("note") else ""))
    if "first_warmup_s" in line:
        parts.append(f"warm-up {line['first_warmup_s']:.1f} s then {line['second_warmup_s']:.1f} s"
                     + (" (compile disabled by TORCH_COMPILE_DISABLE)" if line.get("compile_disabled_by_env") else ""))
    if "share" in line:  # probes: how a default run's time divides
        parts.append(f"{line['probe_images']} probe images x {line['sample_steps']} steps: {line['probe_s']:.1f} s, "
                     f"probes {line['share']['probes']:.0%} and deterministic loss {line['share']['dloss']:.0%} "
                     "of a run")
    if line.get("peak_gib") is not None:
        parts.append(f"peak {line['peak_gib']:.2f} GiB")
    if "speedup" in line:
        parts.append(f"speedup {line['speedup']:.2f}x")
    if "vs_ours" in line:
        parts.append(f"{line['vs_ours']:.2f}x ours")
    return f"{name} " + ", ".join(parts) + f"  [{line['wall_s']:.0f} s]"


def main(argv: list[str] | None = None, env: dict | None = None, preamble: dict | None = None) -> int:
    """Run the selected variants; `env` and `preamble` come from bench/device.py on a bare machine."""
    args = parse_args(argv)
    if args.devices is not None:
        from bench import scaling

        return scaling.main(["--devices", str(args.devices), "--out", str(args.out),
                             *(["--steps", str(args.steps)] if args.steps else [])])
    session_dir = Path(tempfile.mkdtemp(prefix="tistudio-bench-session-"))
    try:  # everything the children write (caches, images, a random CLIP) lives here and goes
        env = {**child_env(session_dir), **(env or {})}
        return run_session(args, env, preamble or {}, session_dir)
    finally:
        shutil.rmtree(session_dir, ignore_errors=True)


def run_session(args, env: dict, preamble: dict, session_dir: Path) -> int:
    started = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile("w+") as probe_log:
        try:
            found = probe(env, probe_log)
        except (RuntimeError, subprocess.TimeoutExpired, ValueError) as exc:
            probe_log.seek(0)
            results = Results(args.out, "unknown")
            results.write({"environment": True, "error": str(exc), "output_tail": probe_log.read()[-4000:],
                           **preamble})
            print(f"bench: {exc}\n  results: {results.path}", file=sys.stderr)
            return 1
    kind = "cuda" if found["cuda"] else "cpu"
    settings = dict(DEFAULTS[kind])
    settings.update({k: v for k, v in vars(args).items() if k in settings and v is not None})
    results = Results(args.out, slug(found["device_name"]) if kind == "cuda" else "cpu")
    environment = {"environment": True, "kind": kind, **found, "settings": settings,
                   "date": dt.date.today().isoformat(), **preamble}
    results.write(environment)
    print(f"device: {found['device_name']} ({kind}), torch {found['torch']}, transformers {found['transformers']}, "
          f"diffusers {found['diffusers']}; results -> {results.path}")
    deadline = started + settings["budget"] if settings["budget"] else None
    for variant in args.variants:
        line = run_variant(variant, kind, settings, args, results, env, session_dir, deadline)
        line.update({"device": found["device_name"], "torch": found["torch"], "date": environment["date"]})
        add_ratio(variant, line, results.lines.get(variant.against))
        results.write(line)
        print(summary_line(line), flush=True)
    failed = [n for n, line in results.lines.items() if line["status"] in ("error", "timeout")]
    print(f"{len(results.lines)} variants in {time.monotonic() - started:.0f} s"
          + (f"; failed: {', '.join(failed)} (see {results.log_path.name})" if failed else "")
          + f"\nresults: {results.path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
