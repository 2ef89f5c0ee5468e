"""One frontier: every method's Table 1 (mean ± standard error over seeds) as a point, SD's point, the
Pareto front, the paired difference from `none`; and `experiment regularize --seeds` over any mix."""

from __future__ import annotations

import json
import math

import pytest
from PIL import Image

from engine.store.frontier import frontier, frontier_lines, paired, points
from engine.store.library import Library
from engine.store.paths import home_dir
from engine.store.runs import load_run
from engine.worker.job_kinds import handle_experiment
from tistudio.screens.experiment_modal import experiment_params

FAST = dict(images=1, clip="builtin:tiny", sample_steps=1)


def _row(method, seed, recon, edit):
    return {"model": "SD+TI", "method": method, "seed": seed, "reconstruction": recon, "editability": edit}


def test_points_are_means_with_standard_errors_and_the_front_is_what_nothing_beats():
    rows = [{"model": "SD", "label": "SD", "reconstruction": 0.20, "editability": 0.49},
            _row("none", 0, 0.40, 0.40), _row("none", 1, 0.44, 0.38),
            _row("a", 0, 0.30, 0.45), _row("a", 1, 0.30, 0.47),
            _row("b", 0, 0.35, 0.39), _row("b", 1, 0.37, 0.39)]  # b: beaten by none in both numbers
    found = {p.label: p for p in points(rows)}
    assert list(found) == ["SD", "none", "a", "b"]
    none = found["none"]
    assert (none.reconstruction, none.editability, none.runs) == (pytest.approx(0.42), pytest.approx(0.39), 2)
    assert none.se_reconstruction == pytest.approx(math.sqrt(0.0008 / 2))  # sample sd / sqrt(n)
    assert found["SD"].se_reconstruction is None and found["SD"].sd
    assert [p.label for p in found.values() if p.front] == ["SD", "none", "a"]
    delta = paired(rows, "a")  # a - none, seed by seed
    assert delta["reconstruction"][0] == pytest.approx(-0.12) and delta["editability"][0] == pytest.approx(0.07)
    assert delta["editability"][1] == pytest.approx(0.02) and delta["editability"][2] == 2  # SE of 0.05, 0.09
    data = frontier(rows)
    assert set(data["vs_none"]) == {"a", "b"}
    lines = frontier_lines(data)
    assert "| a | 2 | 0.3000 ± 0.0000 | 0.4600 ± 0.0100 | -0.1200 ± 0.0200 / +0.0700 ± 0.0200 | ★ |" in lines


def test_the_dialog_takes_several_seeds_for_the_trade_off():
    params = experiment_params("regularize", values="none, cross+per-layer", steps="4", seed="0, 1, 2")
    assert params["seeds"] == [0, 1, 2] and "seed" not in params
    assert params["values"] == ["none", "cross+per-layer"]


@pytest.fixture
def library(image_dir):
    lib = Library(home_dir())
    lib.add("cat", image_dir, "cat", description="a small grey cat")
    return lib


def test_the_trade_off_experiment_trains_every_method_at_every_seed(tiny_model, library):
    """none and cross+per-layer at seeds 0 and 1: one sweep (per-layer members in a batch of their own),
    each method's point the mean of its two runs, the frontier in table.json, table.md and frontier.png."""
    from engine.store import runs as jobs
    from engine.worker.context import JobContext
    from engine.worker.job_kinds import remember_model

    params = {"model": "builtin:tiny", "kind": "regularize", "values": ["none", "cross+per-layer"],
              "seeds": [0, 1], "steps": 2, "lr": 5e-2, "save_every": 2, "log_every": 1,
              "prompts": ["a {} in space"], **FAST}
    spec = {"kind": "experiment", "concept": "cat", "params": params}
    run_dir = jobs.create_run(library.home, spec)
    ctx = JobContext(spec, run_dir.name, run_dir, library.home)
    remember_model(ctx.cache, tiny_model, "builtin:tiny")
    result = handle_experiment(ctx)
    concept = library.get("cat")
    method = "cross+per-layer"
    assert [(r["method"], r["seed"]) for r in result["runs"]] == [("none", 0), (method, 0), ("none", 1), (method, 1)]
    members = [load_run(concept.runs_dir / r["run"])["params"] for r in result["runs"]]
    assert [(m.get("per_layer", False), m.get("init_mode", "token")) for m in members] == [
        (False, "token"), (True, "cross")] * 2
    assert members[0]["seed"] == 0 and members[3]["seed"] == 1
    data = result["frontier"]
    by_label = {p["label"]: p for p in data["points"]}
    assert list(by_label) == ["SD", "none", method] and by_label[method]["runs"] == 2
    ours = [r["reconstruction"] for r in result["runs"] if r["method"] == method]
    assert by_label[method]["reconstruction"] == pytest.approx(sum(ours) / 2)
    assert by_label[method]["se_reconstruction"] == pytest.approx(abs(ours[0] - ours[1]) / 2)
    assert any(p["front"] for p in data["points"]) and set(data["vs_none"]) == {method}
    exp_dir = concept.path / "experiments" / result["id"]
    assert json.loads((exp_dir / "table.json").read_text())["frontier"] == data
    markdown = (exp_dir / "table.md").read_text()
    assert "## The frontier" in markdown and f"| {method} | 2 |" in markdown and "Pareto front" in markdown
    with Image.open(exp_dir / "frontier.png") as png:
        assert png.size == (720, 540)
