"""`tistudio train` and friends: every option reaches the run, and a refused job leaves nothing.

Reproduces what a new user on a GPU box met: `--lr nan` slipped past the CLI and left a
failed run with no message; `eval` on an untrained concept left a failed eval record and
suggested an option `eval` does not have.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tistudio.cli import main

pytestmark = pytest.mark.timeout(600)


def cli(capsys, *argv):
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse's own refusals exit 2 the same way
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def _runs(home: Path) -> list[Path]:
    return sorted(home.glob("concepts/*/runs/*")) + sorted(home.glob("jobs/*"))


def _event(home: Path, run_id: str, kind: str) -> dict:
    """The first event of type `kind` in the run's log (JSON lines)."""
    [run_dir] = [r for r in _runs(Path(home)) if r.name == run_id]
    lines = (run_dir / "events.jsonl").read_text().splitlines()
    return next(e for e in map(json.loads, lines) if e.get("type") == kind)


@pytest.fixture
def toy(capsys, image_dir):
    assert cli(capsys, "concept", "add", "toy", "--images", str(image_dir), "--init", "cat")[0] == 0
    return "toy"


BAD_TRAIN = [
    (["--lr", "nan"], "--lr"),
    (["--lr", "inf"], "--lr"),
    (["--lr", "-1"], "--lr must be a positive number"),
    (["--weight-decay", "-0.5"], "--weight-decay"),
    (["--resolution", "100"], "--resolution must be a multiple of 8"),
    (["--flip", "2"], "--flip must be between 0 and 1"),
    (["--compile", "fast"], "--compile"),
    (["--device", "gpu0"], "--device 'gpu0' is not a device"),
    (["--vectors", "40"], "--vectors must be a whole number from 1 to 16"),
    (["--init", "red teapot", "--vectors", "3"], "but --vectors is 3"),
    (["--init", "xqzzyqv"], "splits into"),
    (["--inits", "cat,xqzzyqv"], "splits into"),
    (["--templates", "/no/such/file"], "--templates: prompts file /no/such/file not found"),
    (["--init-from", "/no/such.safetensors"], "--init-from /no/such.safetensors: no such file"),
    (["--keep-checkpoints", "0"], "--keep-checkpoints"),
    (["--regularize", "sideways"], "unknown regulariser 'sideways'"),
    (["--regularize", "directional:0.5"], "directional takes no strength"),
    (["--regularize", "none,init-l2:-1"], "the strength after ':' must be a positive number"),
]


@pytest.mark.parametrize("extra, needle", BAD_TRAIN, ids=[" ".join(a) for a, _ in BAD_TRAIN])
def test_a_refused_train_exits_2_with_one_line_and_leaves_nothing(capsys, toy, extra, needle):
    home = Path(os.environ["TISTUDIO_HOME"])
    code, out, err = cli(capsys, "train", "toy", "--steps", "2", *extra)
    assert code == 2, (out, err)
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err
    assert _runs(home) == []
    assert not (home / "engine" / "engine.sock").exists()  # nothing was even submitted


def test_templates_without_a_slot_are_refused(capsys, toy, tmp_path):
    bad = tmp_path / "templates.txt"
    bad.write_text("# mine\na photo of my thing\n")
    code, _, err = cli(capsys, "train", "toy", "--templates", str(bad))
    assert code == 2 and "--templates" in err and "has no {}" in err


def test_eval_of_an_untrained_concept_names_options_eval_has(capsys, toy):
    home = Path(os.environ["TISTUDIO_HOME"])
    code, _, err = cli(capsys, "eval", "toy")
    assert code == 2 and "no finished training run" in err
    assert "--run RUN --step STEP" in err and "--use" not in err
    assert _runs(home) == []


def test_eval_of_a_concept_without_images_says_how_to_add_them(capsys, tmp_path):
    import torch

    from engine.sd.formats import write_embedding

    path = write_embedding(tmp_path / "e.safetensors", torch.zeros(1, 32), "<imp>", "diffusers")
    assert cli(capsys, "import", str(path), "--name", "imp")[0] == 0
    code, _, err = cli(capsys, "eval", "imp")
    assert code == 2 and "tistudio concept images add imp" in err
    code, _, err = cli(capsys, "train", "imp")
    assert code == 2 and "tistudio concept images add imp" in err


def test_concept_images_add_and_rm(capsys, toy, tmp_path):
    from helpers import make_images

    more = make_images(tmp_path / "more", count=2)
    code, out, err = cli(capsys, "concept", "images", "add", "toy", str(more), str(next(more.iterdir())))
    assert code == 0, err
    shown = json.loads(cli(capsys, "concept", "show", "toy", "--json")[1])
    assert len(shown["image_files"]) == 6
    before = sorted(Path(p).name for p in shown["image_files"])
    code, _, err = cli(capsys, "concept", "images", "rm", "toy", before[0], "999.png")
    assert code == 2 and "no training image '999.png'" in err
    assert len(json.loads(cli(capsys, "concept", "show", "toy", "--json")[1])["image_files"]) == 6  # all or nothing
    assert cli(capsys, "concept", "images", "rm", "toy", before[0])[0] == 0
    after = sorted(Path(p).name for p in json.loads(cli(capsys, "concept", "show", "toy", "--json")[1])["image_files"])
    assert after == before[1:]
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    code, _, err = cli(capsys, "concept", "images", "add", "toy", str(bad))
    assert code == 2 and err.count("\n") == 1
    assert sorted(Path(p).name for p in json.loads(cli(capsys, "concept", "show", "toy", "--json")[1])[
        "image_files"]) == after


def test_train_options_reach_the_run_record(engine_home, capsys, image_dir, tmp_path):
    assert cli(capsys, "concept", "add", "toy", "--images", str(image_dir), "--init", "cat")[0] == 0
    templates = tmp_path / "t.txt"
    templates.write_text("a photo of {}\n# a comment\n\na rendering of {}\n")
    code, out, err = cli(capsys, "train", "toy", "--steps", "4", "--save-every", "2", "--preview-every", "0",
                         "--low-vram", "--weight-decay", "0", "--resolution", "32", "--templates", str(templates),
                         "--device", "cpu", "--lr-schedule", "cosine", "--warmup-steps", "1",
                         "--regularize", "init-l2:0.25", "--deterministic", "--log-every", "2",
                         "--tensorboard", str(tmp_path / "tb"))
    assert code == 0, err
    assert "training toy: 4 steps" in out
    [run] = json.loads(cli(capsys, "runs", "--json")[1])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(tmp_path / "tb" / run["id"]))  # TensorBoard's own reader: the run's steps
    board.Reload()
    assert [s.step for s in board.Scalars("train/loss")] == [2, 4] and board.Scalars("train/reg")
    record = json.loads((Path(engine_home) / "concepts" / "toy" / "runs" / run["id"] / "run.json").read_text())
    assert record["status"] == "done"
    params, config = record["params"], record["config"]
    assert params["device"] == "cpu" and params["low_vram"] is True
    assert config["low_vram"] is True and config["weight_decay"] == 0 and config["resolution"] == 32
    assert config["templates"] == ["a photo of {}", "a rendering of {}"]
    assert config["lr_schedule"] == "cosine" and config["warmup_steps"] == 1
    assert config["regularize"] == "init-l2" and config["reg_weight"] == 0.25
    assert params["deterministic"] is True and config["deterministic"] is True
    header = _event(engine_home, run["id"], "train")  # the job ran under torch's deterministic algorithms
    assert header["deterministic"] is True and header["cublas_workspace_config"] == ":4096:8"
