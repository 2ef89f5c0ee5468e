"""Knowing when a word is learned (issue 25): the deterministic loss and probes as events, the
stop rules, the best step, the warnings, and NAME@RUN:best wherever a saved step goes.

The rules are pure functions of a run's events (engine.inversion.stopping), tested on their own
first; then tiny runs (builtin:tiny: 20 steps, probes every 10 with 2+1 images of 2 sampling
steps) show the events, that measuring never changes the training, that a run stops where its
rule says and keeps that step, and one engine round trip killed twice stops where the
uninterrupted run stops.
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path

import pytest
import torch

from engine.errors import UserError
from engine.inversion.stopping import NORM_FACTOR, Watch, choose_best
from engine.inversion.train import QuietReporter, RunSlot, TrainConfig, train, train_many
from engine.sd.formats import read_embedding
from engine.settings.stopping import EDIT_TOLERANCE, PLATEAU_THRESHOLD, parse_stop_when
from engine.store.history import counted

pytestmark = pytest.mark.timeout(300)

FAST = dict(steps=20, probe_every=10, dloss_every=5, probe_images=2, probe_edit_images=1, probe_steps=2,
            save_every=10, log_every=5, preview_every=0, seed=3)


def _cfg(**overrides) -> TrainConfig:
    return TrainConfig(token="<toy>", init="cat", **{**FAST, **overrides})


def _images(image_dir: Path) -> list[Path]:
    return sorted(image_dir.iterdir())


def _of(events: list[dict], kind: str) -> list[dict]:
    return [e for e in events if e["type"] == kind]


# --- the rules, on their own -----------------------------------------------------------------------


def _watch(stop_when: str | None = None, best_by: str = "tradeoff", dloss_every: int = 1) -> Watch:
    return Watch(parse_stop_when(stop_when), best_by, dloss_every, vocab_max=[1.0])


def test_plateau_is_dvars_rule_recomputed_independently():
    """var(last W) / var(all) < 0.15 (population variances), not before W + 1 values: the stop
    lands on the first value where an independent recomputation says so."""
    values = [1.0 / (1 + 0.3 * i) + 0.002 * ((-1) ** i) for i in range(60)]
    watch, window = _watch("plateau:6"), 6
    stopped_at = None
    for i, v in enumerate(values):
        if [e for e in watch.observe({"type": "dloss", "step": i, "dloss": v}) if e["type"] == "stopped"]:
            stopped_at = i
            break
    expected = next(i for i in range(window, len(values))
                    if statistics.pvariance(values[i - window + 1:i + 1]) / statistics.pvariance(values[:i + 1])
                    < PLATEAU_THRESHOLD)
    assert stopped_at == expected and stopped_at >= window
    assert watch.stopped["rule"] == "plateau" and "flattened" in watch.stopped["why"]
    assert watch.observe({"type": "dloss", "step": 99, "dloss": 5.0}) == []  # stopped: nothing more


def test_a_rising_loss_and_a_runaway_norm_warn_once_and_diverged_stops():
    watch = _watch("diverged")
    found = []
    for i, v in enumerate([1.0, 0.9, 0.8] + [0.8 + 0.1 * i for i in range(1, 400)]):
        found += watch.observe({"type": "dloss", "step": i, "dloss": v})
    assert [e["kind"] for e in _of(found, "warning")] == ["rising"]
    assert _of(found, "stopped")[0]["rule"] == "diverged"
    norms = _watch()
    calm = norms.observe({"type": "step", "step": 10, "norm": NORM_FACTOR * 0.9, "norms": [NORM_FACTOR * 0.9]})
    wild = norms.observe({"type": "step", "step": 20, "norm": 117.0, "norms": [117.0]})
    again = norms.observe({"type": "step", "step": 30, "norm": 300.0, "norms": [300.0]})
    assert calm == [] and again == [] and wild[0]["kind"] == "norm" and "117" in wild[0]["message"]
    assert norms.stopped is None  # a warning alone stops nothing without --stop-when diverged


def test_probes_not_above_sd_warn_and_recon_stops():
    watch = _watch("recon:0.6")
    watch.observe({"type": "probe", "step": 0, "row": "SD", "reconstruction": 0.5, "editability": 0.3})
    first = watch.observe({"type": "probe", "step": 10, "row": "SD+TI", "reconstruction": 0.45, "editability": 0.3})
    second = watch.observe({"type": "probe", "step": 20, "row": "SD+TI", "reconstruction": 0.5, "editability": 0.3})
    assert not _of(first, "warning") and _of(second, "warning")[0]["kind"] == "not-learning"
    third = watch.observe({"type": "probe", "step": 30, "row": "SD+TI", "reconstruction": 0.61, "editability": 0.2})
    assert _of(third, "stopped") == [{"type": "stopped", "step": 30, "rule": "recon",
                                      "why": "a probe's reconstruction reached 0.610 (>= 0.6)"}]


def test_the_best_step_by_each_rule():
    sd = {"step": 0, "reconstruction": 0.2, "editability": 0.5}
    probes = [{"step": 10, "reconstruction": 0.30, "editability": 0.48},
              {"step": 20, "reconstruction": 0.40, "editability": 0.40},
              {"step": 30, "reconstruction": 0.45, "editability": 0.25}]  # below 60% of SD's editability
    assert 0.25 < 0.5 * (1 - EDIT_TOLERANCE) <= 0.40
    assert choose_best(probes, sd, "tradeoff")["step"] == 20
    assert choose_best(probes, sd, "recon")["step"] == 30
    assert choose_best(probes, sd, "edit")["step"] == 10
    assert choose_best(probes, sd, "balanced")["step"] == 20  # 0.80 beats 0.78 and 0.70
    fallback = choose_best(probes[2:], sd, "tradeoff")
    assert fallback["step"] == 30 and fallback["rule"] == "tradeoff" and "no probe kept" in fallback["why"]
    assert choose_best([], sd, "recon") is None


def test_history_drops_what_a_killed_attempt_logged_past_its_checkpoint():
    log = [{"type": "train", "step": 0}, {"type": "dloss", "step": 0}, {"type": "dloss", "step": 5},
           {"type": "checkpoint", "step": 10}, {"type": "dloss", "step": 10}, {"type": "dloss", "step": 15},
           {"type": "status", "status": "interrupted"},
           {"type": "train", "step": 10}, {"type": "dloss", "step": 15}, {"type": "dloss", "step": 20}]
    steps = [e["step"] for e in counted(log) if e["type"] == "dloss"]
    assert steps == [0, 5, 10, 15, 20]  # the first attempt's 15 is gone; the second's counts
    assert [e["step"] for e in counted(log, upto=10) if e["type"] == "dloss"] == [0, 5, 10]


BAD_STOPS = [("recon:2", "above 0 and at most 1"), ("recon:x", "above 0"), ("sometimes", "unknown --stop-when"),
             ("plateau:-3", "whole number of steps"), ("plateau,plateau", "each rule once")]


@pytest.mark.parametrize("text, needle", BAD_STOPS, ids=[t for t, _ in BAD_STOPS])
def test_bad_stop_rules_are_one_line(text, needle):
    with pytest.raises(UserError, match=needle):
        _cfg(stop_when=text).validate()


# --- tiny runs -------------------------------------------------------------------------------------


def test_probes_and_the_deterministic_loss_are_events_and_leave_the_training_as_it_was(
        tiny_model, image_dir, tmp_path):
    images = _images(image_dir)
    watched = QuietReporter()
    final = train(tiny_model, _cfg(), tmp_path / "watched", images, watched, description="a toy cat")
    plain = train(tiny_model, _cfg(probe_every=0, dloss_every=0), tmp_path / "plain", images)
    # measuring reads the vectors and draws nothing from the training stream: the same word, bit for bit
    assert torch.equal(read_embedding(final).vectors, read_embedding(plain).vectors)
    events = watched.events
    assert [e["step"] for e in _of(events, "dloss")] == [0, 5, 10, 15, 20]
    assert all(isinstance(e["dloss"], float) for e in _of(events, "dloss"))
    probes = _of(events, "probe")
    assert [(p["step"], p["row"]) for p in probes] == [(0, "SD"), (10, "SD+TI"), (20, "SD+TI")]
    for probe in probes:
        assert -1 <= probe["reconstruction"] <= 1 and -1 <= probe["editability"] <= 1
        assert [len(s) for s in probe["images"]] == [2, 1, 1, 1]  # 2 neutral, 1 per edit prompt
        assert all(Path(p).is_file() for s in probe["images"] for p in s)
    assert Path(probes[1]["images"][0][0]).parent == tmp_path / "watched" / "probes" / "step-10"
    watch = _of(events, "watch")[0]
    assert watch["dloss_every"] == 5 and watch["probe_every"] == 10 and watch["best_by"] == "tradeoff"
    best = _of(events, "best")[-1]["best"]
    assert best["step"] in (10, 20) and best["rule"] == "tradeoff"
    assert (tmp_path / "watched" / "embeddings" / f"learned_embeds-steps-{best['step']}.safetensors").is_file()
    assert _of(events, "stopped") == [{"type": "stopped", "step": 20, "rule": "steps", "why": "ran its --steps 20"}]
    # (that the same seed draws the same batch, in another process too: the kill -9 test below)


def test_a_run_that_meets_its_rule_stops_there_and_keeps_that_step(tiny_model, image_dir, tmp_path):
    reporter = QuietReporter()
    final = train(tiny_model, _cfg(stop_when="recon:0.01", probe_images=1), tmp_path / "run",
                  _images(image_dir), reporter)
    [stopped] = _of(reporter.events, "stopped")
    assert stopped["step"] == 10 and stopped["rule"] == "recon"
    assert max(e["step"] for e in _of(reporter.events, "step")) == 10  # no step after its stop
    at_stop = read_embedding(tmp_path / "run" / "embeddings" / "learned_embeds-steps-10.safetensors")
    assert torch.equal(read_embedding(final).vectors, at_stop.vectors)


def test_a_deliberately_bad_learning_rate_warns_and_diverged_stops_it(tiny_model, image_dir, tmp_path):
    """`--lr 50` drives the vector's norm far past the vocabulary's largest: a warning, and with
    --stop-when diverged the run ends there (done, not failed)."""
    reporter = QuietReporter()
    train(tiny_model, _cfg(lr=50.0, probe_every=0, stop_when="diverged", log_every=1), tmp_path / "run",
          _images(image_dir), reporter)
    [warning] = [w for w in _of(reporter.events, "warning") if w["kind"] == "norm"]
    vocab = _of(reporter.events, "watch")[0]["vocab_max"][0]
    norm = next(e["norm"] for e in _of(reporter.events, "step") if e["step"] == warning["step"])
    assert norm > NORM_FACTOR * vocab and "lower --lr" in warning["message"]
    [stopped] = _of(reporter.events, "stopped")
    assert stopped["rule"] == "diverged" and stopped["step"] == warning["step"] < 20


def test_in_a_batch_a_member_stops_alone_and_the_other_trains_on_as_its_solo_run(tiny_model, image_dir, tmp_path):
    images = _images(image_dir)
    cfg, first = dict(steps=10, probe_every=0, dloss_every=1), QuietReporter()
    slots = [RunSlot(_cfg(stop_when="plateau:4", seed=3, **cfg), tmp_path / "a", images, first),
             RunSlot(_cfg(seed=2, **cfg), tmp_path / "b", images)]
    finals = train_many(tiny_model, slots)
    solo = train(tiny_model, _cfg(seed=2, **{**cfg, "dloss_every": 0}), tmp_path / "solo", images)
    [stopped] = _of(first.events, "stopped")
    assert stopped["rule"] == "plateau" and stopped["step"] < 10
    at_stop = read_embedding(tmp_path / "a" / "embeddings" / f"learned_embeds-steps-{stopped['step']}.safetensors")
    assert torch.equal(read_embedding(finals[0]).vectors, at_stop.vectors)
    assert max(e["step"] for e in _of(first.events, "dloss")) == stopped["step"]  # quiet after its stop
    torch.testing.assert_close(read_embedding(finals[1]).vectors, read_embedding(solo).vectors,
                               rtol=1e-4, atol=1e-5)


# --- NAME@RUN:best everywhere -----------------------------------------------------------------------


def _job_run(home: Path, concept, tiny_model, params: dict) -> str:
    """A train run as the worker runs one (its record, its log, ContextReporter), without an engine."""
    from engine.store.runs import create_run, set_status
    from engine.worker.context import JobContext
    from engine.worker.sweeps import ContextReporter, train_config_from

    run_dir = create_run(home, {"kind": "train", "concept": concept.name, "params": params})
    ctx = JobContext({"kind": "train", "concept": concept.name, "params": params}, run_dir.name, run_dir, home)
    config = train_config_from(params, concept)
    final = train(tiny_model, config, run_dir, concept.images, ContextReporter(ctx), description=concept.description)
    ctx.flush()
    set_status(run_dir, "done", log=ctx.log, embedding=str(final))
    return run_dir.name


@pytest.fixture(scope="module")
def probed(tiny_model, tmp_path_factory):
    """A library with one concept and two finished runs: one probed (a best step), one not."""
    from engine.sd.models import load_tokenizer
    from engine.store.library import Library
    from helpers import make_images

    home = tmp_path_factory.mktemp("best-home")
    images = make_images(tmp_path_factory.mktemp("best-images"), count=3)
    concept = Library(home).add("toy", images, "cat", tokenizer=load_tokenizer(), description="a toy cat")
    params = {k: v for k, v in FAST.items()} | {"best_by": "edit", "probe_images": 1}
    run = _job_run(home, concept, tiny_model, params)
    bare = _job_run(home, concept, tiny_model, {**params, "probe_every": 0, "dloss_every": 0, "steps": 5})
    return home, run, bare


def test_the_record_names_the_best_step_and_where_the_run_stopped(probed):
    from engine.store.runs import load_run

    home, run, bare = probed
    record = load_run(home / "concepts" / "toy" / "runs" / run)
    assert record["best"]["rule"] == "edit" and record["best"]["step"] in (10, 20)
    assert record["stopped"] == {"step": 20, "rule": "steps", "why": "ran its --steps 20"}
    assert isinstance(record["warnings"], list)
    assert load_run(home / "concepts" / "toy" / "runs" / bare).get("best") is None


def test_best_resolves_wherever_a_saved_step_goes(probed, tiny_model, tmp_path, monkeypatch, capsys):
    from engine.inversion.init_from import load_init_from
    from engine.inversion.inspector import inspect_word
    from engine.inversion.merge import merge
    from engine.inversion.metrics import evaluate
    from engine.sd.generation import load_used, parse_use, resolve_embeddings
    from engine.settings.jobs import check_job
    from engine.store.library import Library
    from engine.store.records import parse_pin, summarize
    from engine.store.runs import load_run
    from tistudio.cli import main

    home, run, _ = probed
    monkeypatch.setenv("TISTUDIO_HOME", str(home))
    library = Library(home)
    step = load_run(home / "concepts" / "toy" / "runs" / run)["best"]["step"]
    saved = read_embedding(home / "concepts" / "toy" / "runs" / run / "embeddings"
                           / f"learned_embeds-steps-{step}.safetensors").vectors
    pin = f"toy@{run}:best"
    assert parse_use(pin, library) == ("toy", run, "best") and parse_pin(pin) == ("toy", run, "best")
    # generate --use, init-from, merge, inspect, eval: each gets the best step's vectors
    [used] = resolve_embeddings(library, "a photo of <toy>", [pin])
    assert used.step == step and torch.equal(used.vectors, saved) and used.ref == f"toy@{run}:{step}"
    assert torch.equal(load_init_from(pin, home).vectors, saved)
    merge(library, [pin, f"toy@{run}:{step}"], name="best-copy")  # the same word twice: a mix equal to it
    assert torch.equal(load_used(library.get("best-copy")).vectors, saved)
    assert inspect_word(tiny_model, library, "toy", run, "best")["step"] == step
    table = evaluate(tiny_model, library, "toy", run, "best", images=1, clip="builtin:tiny", sample_steps=2)
    assert table["step"] == step and not table["final"]
    # the engine's door and the CLI: --step best
    check_job("eval", {"run": run, "step": "best"}, library.get("toy"))
    with pytest.raises(UserError, match="--step"):
        check_job("eval", {"run": run, "step": "worst"}, library.get("toy"))
    out = tmp_path / "best.safetensors"
    assert main(["export", "toy", "--run", run, "--step", "best", "--out", str(out)]) == 0
    assert torch.equal(read_embedding(out).vectors, saved)
    # the studio's Use and Run fields offer (and so accept) it
    assert pin in summarize(library.get("toy")).pins()
    capsys.readouterr()


def test_best_on_a_run_without_probes_is_one_line_and_writes_nothing(probed, tmp_path, monkeypatch, capsys):
    from engine.sd.generation import load_used
    from engine.store.library import Library
    from engine.store.records import summarize
    from tistudio.cli import main

    home, _, bare = probed
    monkeypatch.setenv("TISTUDIO_HOME", str(home))
    with pytest.raises(UserError, match="has no best step: it has no probes"):
        load_used(Library(home).get("toy"), bare, "best")
    out = tmp_path / "never.safetensors"
    code = main(["export", "toy", "--run", bare, "--step", "best", "--out", str(out)])
    err = capsys.readouterr().err
    assert code != 0 and "has no best step" in err and err.count("\n") == 1 and not out.exists()
    assert f"toy@{bare}:best" not in summarize(Library(home).get("toy")).pins()


# --- the CLI ---------------------------------------------------------------------------------------


BAD_CLI = [(["--probe-every", "-1"], "--probe-every"), (["--probe-every", "often"], "--probe-every"),
           (["--stop-when", "sometimes"], "unknown --stop-when rule"), (["--stop-when", "recon:2"], "recon:2"),
           (["--dloss-every", "0", "--stop-when", "plateau"], "--dloss-every")]


@pytest.mark.parametrize("extra, needle", BAD_CLI, ids=[" ".join(a) for a, _ in BAD_CLI])
def test_a_refused_stop_or_probe_option_exits_2_and_leaves_nothing(capsys, image_dir, extra, needle):
    from tistudio.cli import main

    home = Path(os.environ["TISTUDIO_HOME"])
    assert main(["concept", "add", "toy", "--images", str(image_dir), "--init", "cat"]) == 0
    capsys.readouterr()
    try:
        code = main(["train", "toy", "--steps", "2", *extra])
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and needle in err and err.strip().count("\n") <= 1 and "Traceback" not in err
    assert list(home.glob("concepts/*/runs/*")) == [] and not (home / "engine" / "engine.sock").exists()


def test_progress_prints_probes_warnings_the_best_step_and_the_stop(capsys):
    from tistudio.commands.progress import RunProgress

    view = RunProgress("r1")
    view.plain = True
    for event in [{"type": "probe", "step": 0, "row": "SD", "reconstruction": 0.2, "editability": 0.5},
                  {"type": "dloss", "step": 500, "dloss": 0.1234},
                  {"type": "probe", "step": 500, "row": "SD+TI", "reconstruction": 0.41, "editability": 0.45},
                  {"type": "best", "step": 500, "best": {"step": 500, "rule": "tradeoff", "why": "w"}},
                  {"type": "warning", "step": 500, "kind": "norm", "message": "the word's norm is 117"},
                  {"type": "stopped", "step": 750, "rule": "plateau", "why": "the deterministic loss flattened"}]:
        view.update(event)
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["probe SD (the description): reconstruction 0.200 · editability 0.500",
                     "probe step 500: reconstruction 0.410 · editability 0.450 (SD 0.200 / 0.500)",
                     "best step so far: 500 (tradeoff: w)",
                     "warning: the word's norm is 117",
                     "stopped at step 750 (plateau): the deterministic loss flattened"]
    assert view._dloss() == " · dloss 0.1234"


# --- kill -9 and resume ----------------------------------------------------------------------------


KILLED = {"steps": 40, "lr": 5e-3, "seed": 11, "save_every": 10, "log_every": 5, "preview_every": 0,
          "dloss_every": 2, "stop_when": "plateau:8", "probe_every": 20, "probe_images": 1, "probe_steps": 2}


def test_a_run_killed_mid_way_stops_where_the_uninterrupted_run_stops(engine_home, tiny_model, image_dir, tmp_path,
                                                                       monkeypatch):
    """The worker SIGKILLs itself after step 15: checkpoint 10 is its last, and it has logged
    deterministic losses past it (12, 14).  The resume replays its history up to step 10 (those two
    dropped, logged again) and the run stops at the uninterrupted run's step, with its word, best
    step and losses."""
    from engine.sd.models import load_tokenizer
    from engine.store.history import run_history
    from engine.store.library import Library
    from engine.store.runs import load_run
    from engine.wire.client import call
    from engine.worker.sweeps import train_config_from

    concept = Library(engine_home).add("toy", image_dir, "cat", tokenizer=load_tokenizer())
    reference = QuietReporter()
    expected = read_embedding(train(tiny_model, train_config_from(dict(KILLED), concept), tmp_path / "reference",
                                    concept.images, reference)).vectors
    [stop] = _of(reference.events, "stopped")
    assert stop["rule"] == "plateau" and 20 < stop["step"] < 40, stop  # the resume has a probe to replay too
    monkeypatch.setenv("TISTUDIO_FAULTS", "step@15")
    monkeypatch.setenv("TISTUDIO_FAULTS_STATE", str(tmp_path / "faults"))
    run_id = call("submit", "train", concept="toy", params=KILLED, home=engine_home)
    statuses = [call("wait", run_id, home=engine_home)]
    while statuses[-1] == "interrupted" and len(statuses) < 5:
        call("submit", resume=run_id, home=engine_home)
        statuses.append(call("wait", run_id, home=engine_home))
    assert statuses == ["interrupted", "done"]
    run_dir = engine_home / "concepts" / "toy" / "runs" / run_id
    record = load_run(run_dir)
    assert record["stopped"] == {k: stop[k] for k in ("step", "rule", "why")}
    assert record["best"] == _of(reference.events, "best")[-1]["best"]
    assert torch.equal(read_embedding(record["embedding"]).vectors, expected)
    history = [(e["step"], e["dloss"]) for e in run_history(run_dir) if e["type"] == "dloss"]
    assert history == [(e["step"], e["dloss"]) for e in _of(reference.events, "dloss")]
