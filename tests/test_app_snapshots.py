"""Snapshots of every screen at 80×24 and 100×30 (and the wide layout at 160×45).

The studio runs without the engine here (`engine=False`: it reads the data directory
alone) over a data home made below with fixed run ids, losses and scores, so every
picture is the same on every machine.  Images are drawn as half-blocks.

    pytest tests/test_app_snapshots.py --snapshot-update    # after a deliberate change
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest

from tistudio.app import StudioApp

pytestmark = pytest.mark.filterwarnings("ignore:Image.Image.getdata:DeprecationWarning")

RUN = "20260101-000000-abcd"
OLD_RUN = "20251231-230000-beef"
GEN = "20260101-040000-cafe"
T0 = 1767225600.0  # 2026-01-01 00:00 UTC
GIB = 1024 ** 3


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1))


def _events(path: Path, events: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        for seq, event in enumerate(events, start=1):
            fh.write(json.dumps({"seq": seq, "t": T0 + seq, **event}) + "\n")


def make_demo_home(home: Path) -> Path:
    """A library with the sample concept, a finished and an interrupted run, Table 1,
    a steps curve and one generation: what a user sees after an afternoon."""
    from engine.store.library import Library
    from tistudio.samples import SAMPLE_DESCRIPTION, sample_images

    images = sample_images()
    concept = Library(home).add("sample", images[0].parent, "toy", description=SAMPLE_DESCRIPTION)
    (home / ".sample-offered").write_text("")

    run_dir = concept.runs_dir / RUN
    params = {"steps": 200, "lr": 5e-4, "seed": 0, "save_every": 50, "preview_every": 100, "log_every": 10}
    steps = list(range(10, 201, 10))
    events = [{"type": "status", "status": "queued"}, {"type": "status", "status": "running"},
              {"type": "log", "message": "loading model builtin:tiny on cuda (float16)"},
              {"type": "train", "step": 0, "steps": 200, "family": "sd1", "vectors": 1, "widths": [768],
               "batch_size": 1, "grad_accum": 1, "effective_batch": 1, "resolution": 512, "runs": 1,
               "init_from": None, "regularize": "none", "reg_weight": 0.0, "vocab_norms": [0.385]}]
    for s in steps:
        norm, cos = 0.39 + 0.3 * (1 - math.exp(-s / 80)), 1 - 0.55 * (1 - math.exp(-s / 50))
        events.append({"type": "step", "step": s, "steps": 200, "loss": 0.08 + 0.3 * math.exp(-s / 60)
                       + 0.04 * math.sin(s / 7), "lr": 5e-4, "steps_per_s": 4.0, "elapsed": s / 4.0,
                       "eta": (200 - s) / 4.0, "vram_allocated": (2.1 + 0.002 * s) * GIB,
                       "vram_reserved": 3.0 * GIB, "vram_peak": 2.6 * GIB, "vram_total": 8.0 * GIB,
                       "norm": norm, "cos_init": cos, "norms": [norm], "cos_inits": [cos]})
        if s % 100 == 0:
            preview = run_dir / "previews" / f"step-{s}.png"
            preview.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(images[2 if s == 200 else 1], preview)
            events.append({"type": "preview", "step": s, "path": str(preview), "prompt": "a photo of a <sample>"})
    events.append({"type": "embedding", "step": 200, "path": str(run_dir / "learned_embeds.safetensors"),
                   "final": True})
    events.append({"type": "status", "status": "done"})
    _events(run_dir / "events.jsonl", events)
    _write_json(run_dir / "run.json", {"id": RUN, "kind": "train", "concept": "sample", "params": params,
                                       "model": {"spec": "builtin:tiny", "family": "sd1"},
                                       "status": "done", "step": 200, "steps": 200, "created": T0,
                                       "error": None, "result": None})
    old_dir = concept.runs_dir / OLD_RUN
    _events(old_dir / "events.jsonl", [{"type": "status", "status": "queued"}, {"type": "status", "status": "running"},
                                       {"type": "step", "step": 40, "steps": 2000, "loss": 0.3},
                                       {"type": "status", "status": "interrupted",
                                        "error": "the engine stopped; resume this run"}])
    _write_json(old_dir / "run.json", {"id": OLD_RUN, "kind": "train", "concept": "sample", "params": {},
                                       "status": "interrupted", "step": 40, "steps": 2000, "created": T0 - 3600,
                                       "error": "the engine stopped; resume this run", "result": None})

    prompts = ["a {} on the beach", "a {} in the jungle", "an oil painting of a {}"]
    table = {
        "id": "20260101-020000", "run": RUN, "step": 200, "final": True, "images_per_set": 16,
        "clip": {"name": "ViT-B-32", "weights": None}, "concept": "sample", "token": "<sample>",
        "rows": [{"model": "SD", "reconstruction": 0.6125, "editability": 0.2711, "editability_per_image": 0.2598},
                 {"model": "SD+TI", "reconstruction": 0.7418, "editability": 0.2433,
                  "editability_per_image": 0.2321}],
        "per_prompt": [{"prompt": p, "clip_text": p.format("toy"),
                        "SD": {"editability": 0.27 + 0.01 * i, "editability_per_image": 0.26},
                        "SD+TI": {"editability": 0.24 + 0.005 * i, "editability_per_image": 0.23}}
                       for i, p in enumerate(prompts)],
    }
    _write_json(run_dir / "eval" / "20260101-020000" / "table.json", table)
    earlier = {**table, "id": "20260101-013000", "step": 100, "final": False,
               "rows": [{"model": "SD", "reconstruction": 0.6125, "editability": 0.2711,
                         "editability_per_image": 0.2598},
                        {"model": "SD+TI", "reconstruction": 0.7012, "editability": 0.2561,
                         "editability_per_image": 0.2455}],
               "per_prompt": [{**row, "written": row["prompt"].format("<sample>"),
                               "SD+TI": {"editability": 0.25 + 0.004 * i}}
                              for i, row in enumerate(table["per_prompt"])]}
    _write_json(run_dir / "eval" / "20260101-013000" / "table.json", earlier)
    experiments = concept.path / "experiments"
    seeds = [{"run": f"2026010103{i}000-see{i}", "label": f"seed {i}", "init": "toy", "seed": i,
              "reconstruction": 0.72 + 0.02 * i, "editability": 0.25 - 0.01 * i,
              "editability_per_image": 0.24 - 0.01 * i}
             for i in range(3)]
    _write_json(experiments / "seeds-20260101-033000" / "table.json",
                {"id": "seeds-20260101-033000", "kind": "seeds", "rows": [{"model": "SD+TI", **r} for r in seeds],
                 "runs": seeds, "train": {"steps": 200}, "images_per_set": 4, "seeds": [0, 1, 2, 3]})
    shutil.copy(images[0], experiments / "seeds-20260101-033000" / "grid.png")
    _write_json(experiments / "synthesis-20260101-023000" / "synthesis.json",
                {"id": "synthesis-20260101-023000", "kind": "synthesis", "run": RUN, "step": 200, "final": True,
                 "prompts": ["a <sample> on the moon"], "seeds": [0, 1],
                 "rows": [{"prompt": "a <sample> on the moon", "template": "a {} on the moon", "images": []}]})
    points = [{"step": s, "reconstruction": 0.55 + 0.2 * (1 - math.exp(-s / 80)),
               "editability": 0.28 - 0.04 * (1 - math.exp(-s / 80))} for s in (50, 100, 150, 200)]
    _write_json(concept.path / "experiments" / "steps-20260101-030000" / "curve.json",
                {"id": "steps-20260101-030000", "kind": "steps", "run": RUN, "points": points})

    out = home / "outputs" / "20260101-040000-a-photo-of-sample"
    out.mkdir(parents=True)
    made = []
    word = {"concept": "sample", "run": RUN, "step": 200, "final": True, "token": "<sample>"}
    for i in range(2):
        for mode, src in (("sd", images[3 + i]), ("ti", images[i])):
            path = out / f"{mode}-{i:03d}.png"
            shutil.copy(src, path)
            made.append({"path": str(path), "mode": mode, "seed": i, "prompt": "a photo of <sample>"})
            _write_json(path.with_suffix(".json"), {
                "prompt": "a photo of <sample>" if mode == "ti" else "a photo of a small toy robot",
                "negative_prompt": "", "seed": i, "steps": 25, "guidance": 7.5, "sampler": "DPM++ 2M",
                "width": 512, "height": 512, "mode": mode, "created": "2026-01-01T04:00:00Z",
                "model": {"spec": "builtin:tiny", "family": "sd1"}, "embeddings": [word] if mode == "ti" else []})
    eval_images = run_dir / "eval" / "20260101-020000" / "images" / "ti" / "edit-1"
    eval_images.mkdir(parents=True)
    shutil.copy(images[4], eval_images / "ti-0000.png")
    for age, png in enumerate(sorted(home.rglob("*.png"))):  # the gallery lists by time: make it the same everywhere
        os.utime(png, (T0 + 600 * age, T0 + 600 * age))
    gen_dir = home / "jobs" / GEN
    _events(gen_dir / "events.jsonl", [{"type": "status", "status": "queued"}, {"type": "status", "status": "running"},
                                       *[{"type": "image", **m} for m in made],
                                       {"type": "status", "status": "done", "result": {"images": made}}])
    _write_json(gen_dir / "run.json", {"id": GEN, "kind": "generate", "concept": None, "status": "done",
                                       "params": {"prompt": "a photo of <sample>", "n": 2, "mode": "compare"},
                                       "created": T0 + 7200, "result": {"images": made}})
    return home


@pytest.fixture
def demo_home(tmp_path):
    return make_demo_home(tmp_path / "home")


def app_for(home: Path, theme: str = "tistudio-dark") -> StudioApp:
    return StudioApp(home, "builtin:tiny", engine=False, image_protocol="halfblock", theme=theme)


async def quiet(pilot, limit: float = 10.0) -> None:
    """Wait until the studio has nothing left to draw: no worker running (the image loaders) and no
    change waiting for the screen's next redraw tick, seen three times in a row a fifth of a tick apart."""
    from tistudio.screens.base import REDRAW_SECONDS

    calm, waited, step = 0, 0.0, REDRAW_SECONDS / 5
    while calm < 3 and waited < limit:
        await pilot.pause(step)
        waited += step
        busy = any(w.is_running for w in pilot.app.workers) or getattr(pilot.app.screen, "_dirty", None)
        calm = 0 if busy else calm + 1


def settle(*keys: str):
    async def run_before(pilot) -> None:
        await quiet(pilot)
        for key in keys:
            await pilot.press(key)
            await quiet(pilot)
        for widget in pilot.app.screen.query("Input"):
            widget.cursor_blink = False
        await pilot.wait_for_scheduled_animations()
        await quiet(pilot)

    return run_before


SCREENS = {"library": "1", "train": "2", "generate": "3", "metrics": "4", "gallery": "5"}


@pytest.mark.parametrize("size", [(80, 24), (100, 30)], ids=["80x24", "100x30"])
@pytest.mark.parametrize("screen", list(SCREENS))
def test_screen(snap_compare, demo_home, screen, size):
    assert snap_compare(app_for(demo_home), terminal_size=size, run_before=settle(SCREENS[screen]))


@pytest.mark.parametrize("screen", ["library", "train", "gallery"])
def test_wide_layout(snap_compare, demo_home, screen):
    assert snap_compare(app_for(demo_home), terminal_size=(160, 45), run_before=settle(SCREENS[screen]))


@pytest.mark.parametrize("view", ["compare", "study"])
def test_metrics_views(snap_compare, demo_home, view):
    keys = ("4", "v") if view == "compare" else ("4", "v", "v")
    assert snap_compare(app_for(demo_home), terminal_size=(100, 30), run_before=settle(*keys))


def test_empty_library(snap_compare, tmp_path):
    app = StudioApp(tmp_path / "home", "builtin:tiny", engine=False, image_protocol="halfblock",
                    theme="tistudio-dark", add_sample=False)
    assert snap_compare(app, terminal_size=(80, 24), run_before=settle())


def test_light_theme(snap_compare, demo_home):
    assert snap_compare(app_for(demo_home, "tistudio-light"), terminal_size=(80, 24), run_before=settle("2"))


def test_help(snap_compare, demo_home, monkeypatch):
    monkeypatch.setattr(StudioApp, "describe_settings", lambda self: ["data home: /data/tistudio",
                                                                      "images: halfblock"])
    assert snap_compare(app_for(demo_home), terminal_size=(80, 24), run_before=settle("question_mark"))


def test_new_concept_form(snap_compare, demo_home):
    assert snap_compare(app_for(demo_home), terminal_size=(80, 24), run_before=settle("n"))


# -- with the engine online and a run streaming ---------------------------------------------------

LIVE = "20260101-050000-f00d"


def _live_run(home: Path) -> dict:
    """A run the engine is training now: 120 of 2000 steps logged (its events stream in below)."""
    run_dir = home / "concepts" / "sample" / "runs" / LIVE
    events = [{"type": "status", "status": "queued"}, {"type": "status", "status": "running"},
              {"type": "train", "step": 0, "steps": 2000, "family": "sd1", "vectors": 2, "widths": [768],
               "batch_size": 1, "grad_accum": 4, "effective_batch": 4, "resolution": 512, "runs": 1,
               "init_from": None, "regularize": "init-l2", "reg_weight": 0.003, "vocab_norms": [0.385]}]
    for s in range(10, 121, 10):
        events.append({"type": "step", "step": s, "steps": 2000, "loss": 0.12 + 0.2 * math.exp(-s / 40),
                       "lr": 5e-4, "steps_per_s": 11.5, "elapsed": s / 11.5, "eta": (2000 - s) / 11.5,
                       "vram_allocated": 2.4 * GIB, "vram_reserved": 3.1 * GIB, "vram_peak": 2.7 * GIB,
                       "vram_total": 80.0 * GIB, "norm": 0.4 + 0.001 * s, "cos_init": 1 - 0.002 * s,
                       "norms": [0.4 + 0.001 * s] * 2, "cos_inits": [1 - 0.002 * s] * 2, "reg": 0.0002 * s})
    _events(run_dir / "events.jsonl", events)
    record = {"id": LIVE, "kind": "train", "concept": "sample", "status": "running", "step": 120, "steps": 2000,
              "params": {"steps": 2000, "vectors": 2, "grad_accum": 4, "regularize": "init-l2"},
              "created": T0 + 18000, "device": "cuda:0", "pid": 4321, "error": None, "result": None}
    _write_json(run_dir / "run.json", record)
    return {**record, "run_dir": str(run_dir)}


def _engine_status() -> dict:
    """What `engine status` answers while the run trains on the first of two GPUs."""
    memory = {"vram_total": 80 * GIB, "vram_used_device": 4.0 * GIB, "vram_allocated": 2.4 * GIB,
              "vram_reserved": 3.1 * GIB, "vram_peak": 2.7 * GIB}
    workers = [{"worker": 0, "device": "cuda:0", "backend": "local", "node": None, "pid": 4321, "state": "running",
                "job": LIVE, "kind": "train", "concept": "sample", "members": None, "step": 120, "steps": 2000,
                "steps_per_s": 11.5, "name": "NVIDIA H100 80GB HBM3", "memory": memory, "source": "worker"},
               {"worker": 1, "device": "cuda:1", "backend": "local", "node": None, "pid": None, "state": "none",
                "job": None, "kind": None, "concept": None, "members": None, "step": None, "steps": None,
                "steps_per_s": None, "name": "NVIDIA H100 80GB HBM3",
                "memory": {"vram_total": 80 * GIB, "vram_used_device": 0.5 * GIB}, "source": "nvidia-smi"}]
    return {"pid": 4242, "version": "0.1.0", "queue": 0, "queued": [], "workers": workers,
            "device": {"device": "cuda:0", "name": "NVIDIA H100 80GB HBM3", **memory},
            "backend": {"kind": "local", "devices": ["cuda:0", "cuda:1"]}}


def online_and_streaming(*keys: str):
    """As the bridge reports a live engine: online, its status and runs, then the run's next steps."""
    async def run_before(pilot) -> None:
        from engine.store.runs import list_runs
        from tistudio.messages import EngineSnapshot, EngineStateChanged, RunEvents

        app = pilot.app
        await quiet(pilot)
        app.post_message(EngineStateChanged("online", "pid 4242, 2 workers"))
        app.post_message(EngineSnapshot(_engine_status(), list_runs(app.home)))
        await quiet(pilot)
        more = [{"seq": 16 + i, "t": T0 + 18100 + i, "type": "step", "step": 130 + 10 * i, "steps": 2000,
                 "loss": 0.13 - 0.002 * i, "lr": 5e-4, "steps_per_s": 11.6, "elapsed": (130 + 10 * i) / 11.6,
                 "eta": (1870 - 10 * i) / 11.6, "vram_allocated": 2.4 * GIB, "vram_reserved": 3.1 * GIB,
                 "vram_total": 80.0 * GIB, "norm": 0.53 + 0.001 * i, "cos_init": 0.74 - 0.002 * i}
                for i in range(3)]
        app.post_message(RunEvents(LIVE, more))
        await quiet(pilot)
        await settle(*keys)(pilot)

    return run_before


@pytest.mark.parametrize("screen,size", [("train", (100, 30)), ("library", (80, 24))], ids=["train", "library"])
def test_engine_online_with_a_run_streaming(snap_compare, demo_home, screen, size):
    """The studio as it is most of the time: the engine online on two GPUs, one training a run
    whose steps keep arriving (the status bar, the workers' VRAM, the live run on Train)."""
    _live_run(demo_home)
    assert snap_compare(app_for(demo_home), terminal_size=size, run_before=online_and_streaming(SCREENS[screen]))


def _tradeoff_report(home: Path) -> None:
    """The trade-off experiment's report (`experiment regularize --seeds 0,1,2`): four methods at three
    seeds and the SD row, its frontier written by the engine's own code (engine.store.frontier)."""
    from engine.store.frontier import frontier

    means = {"none": (0.42, 0.40), "init-l2:0.01": (0.24, 0.47), "cross": (0.41, 0.43), "per-layer": (0.45, 0.41)}
    rows = [{"model": "SD", "label": "SD", "reconstruction": 0.1984, "editability": 0.4915,
             "editability_per_image": 0.48}]
    for seed in range(3):
        for method, (recon, edit) in means.items():
            rows.append({"model": "SD+TI", "run": f"r{seed}-{method}", "label": f"{method} · seed {seed}",
                         "method": method, "seed": seed, "reconstruction": recon + 0.01 * (seed - 1),
                         "editability": edit - 0.005 * (seed - 1), "editability_per_image": edit})
    folder = home / "concepts" / "sample" / "experiments" / "regularize-20260101-050000"
    _write_json(folder / "table.json", {"id": "regularize-20260101-050000", "kind": "regularize", "rows": rows,
                                        "runs": rows[1:], "train": {"steps": 2000}, "images_per_set": 16,
                                        "frontier": frontier(rows)})


def test_frontier_in_the_study_view(snap_compare, demo_home):
    """Every method's mean ± standard error, ★ on the Pareto front, and the frontier chart with SD's point."""
    _tradeoff_report(demo_home)
    assert snap_compare(app_for(demo_home), terminal_size=(100, 30), run_before=settle("4", "v", "v"))


# -- knowing when a word is learned (issue 25) -------------------------------------------------------

WATCHED = "20260101-060000-d0e5"


def _watched_run(home: Path) -> None:
    """A finished run that probed itself every 250 steps and stopped on its plateau at 1250: the
    deterministic loss under the raw one, the SD row's probe and five probes, its best step, a warning."""
    run_dir = home / "concepts" / "sample" / "runs" / WATCHED
    events = [{"type": "status", "status": "running"},
              {"type": "train", "step": 0, "steps": 2000, "family": "sd1", "vectors": 1, "widths": [768],
               "batch_size": 1, "grad_accum": 1, "effective_batch": 1, "resolution": 512, "runs": 1,
               "init_from": None, "regularize": "none", "reg_weight": 0.0, "vocab_norms": [0.385]},
              {"type": "watch", "step": 0, "dloss_every": 25, "probe_every": 250, "best_by": "tradeoff",
               "stop_when": ["plateau"], "best": None, "stopped": None, "warned": {}},
              {"type": "probe", "step": 0, "row": "SD", "reconstruction": 0.198, "editability": 0.492, "images": []}]
    for s in range(0, 1251, 25):
        if s and s % 50 == 0:
            norm = 0.39 + 0.25 * (1 - math.exp(-s / 300))
            events.append({"type": "step", "step": s, "steps": 2000, "loss": 0.09 + 0.2 * math.exp(-s / 300)
                           + 0.05 * math.sin(s / 9), "lr": 5e-4, "steps_per_s": 9.0, "elapsed": s / 9.0,
                           "eta": (2000 - s) / 9.0, "norm": norm, "cos_init": 1 - 0.4 * (1 - math.exp(-s / 200)),
                           "norms": [norm], "cos_inits": [1 - 0.4 * (1 - math.exp(-s / 200))]})
        events.append({"type": "dloss", "step": s, "dloss": 0.1 + 0.15 * math.exp(-s / 250)})
        if s and s % 250 == 0:
            recon, edit = 0.198 + 0.25 * (1 - math.exp(-s / 400)), 0.492 - 0.15 * (1 - math.exp(-s / 500))
            events.append({"type": "probe", "step": s, "row": "SD+TI", "reconstruction": recon, "editability": edit,
                           "images": []})
    best = {"step": 1000, "rule": "tradeoff", "why": "the highest reconstruction among probes keeping editability "
            "within 40% of the SD row's", "reconstruction": 0.198 + 0.25 * (1 - math.exp(-2.5)),
            "editability": 0.492 - 0.15 * (1 - math.exp(-2))}
    stopped = {"step": 1250, "rule": "plateau", "why": "the deterministic loss flattened: variance over the last 12 "
               "values is 0.141 of the run's (< 0.15)"}
    warning = {"step": 500, "kind": "not-learning", "message": "the last 2 probes' reconstruction is not above SD's"}
    events += [{"type": "best", "step": 1250, "best": best}, {"type": "warning", **warning},
               {"type": "stopped", **stopped}, {"type": "status", "status": "done"}]
    _events(run_dir / "events.jsonl", events)
    (run_dir / "learned_embeds.safetensors").write_bytes(b"")
    _write_json(run_dir / "run.json", {"id": WATCHED, "kind": "train", "concept": "sample", "status": "done",
                                       "params": {"steps": 2000, "stop_when": "plateau"}, "step": 1250, "steps": 2000,
                                       "created": T0 + 21600, "best": best, "stopped": stopped,
                                       "warnings": [warning], "error": None, "result": None})


@pytest.mark.parametrize("size", [(100, 30), (160, 45)], ids=["100x30", "160x45"])
def test_a_watched_run_on_train(snap_compare, demo_home, size):
    """The deterministic loss over the raw loss, the trade-off path (S: SD's point, *: the best step),
    the best step, why it stopped and its warning; the runs table's Best and Stopped columns."""
    _watched_run(demo_home)
    assert snap_compare(app_for(demo_home), terminal_size=size, run_before=settle("2"))


def test_the_metrics_curve_from_a_runs_probes(snap_compare, demo_home):
    """A run without a steps experiment: its curve over checkpoints is its probes."""
    _watched_run(demo_home)

    async def pick_the_watched_run(pilot) -> None:
        await settle("4")(pilot)
        pilot.app.screen.query_one("#metrics-run").value = f"sample@{WATCHED}"
        await settle()(pilot)

    assert snap_compare(app_for(demo_home), terminal_size=(100, 30), run_before=pick_the_watched_run)
