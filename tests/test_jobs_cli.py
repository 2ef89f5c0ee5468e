"""generate / eval / experiment through the CLI and the real engine (builtin:tiny, tiny CLIP).

The tests share one engine (and its warm worker), and evaluations sample in 2 steps
(`--sample-steps 2`; the default is the study's 25), as the studio's tests do: what is checked
here is the round trip through the CLI and the engine; the measures themselves are
tests/test_metrics.py's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from tistudio.cli import main

pytestmark = pytest.mark.timeout(600)


def cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_train_generate_eval_experiment_end_to_end(shared_engine_home, image_dir, capsys):
    assert cli(capsys, "concept", "add", "toy", "--images", str(image_dir), "--init", "cat")[0] == 0
    code, out, err = cli(capsys, "train", "toy", "--steps", "10", "--save-every", "5", "--preview-every", "10")
    assert code == 0, err

    code, out, err = cli(capsys, "generate", "a photo of <toy> in the snow", "-n", "2", "--steps", "2",
                         "--compare", "--json")
    assert code == 0, err
    images = json.loads(out)
    assert sorted((i["mode"], i["seed"]) for i in images) == [("sd", 0), ("sd", 1), ("ti", 0), ("ti", 1)]
    for image in images:
        png = Image.open(image["path"])
        assert "parameters" in png.text and "Seed: " in png.text["parameters"]
        assert Path(image["path"]).with_suffix(".json").is_file()
    sd_prompt = next(i["prompt"] for i in images if i["mode"] == "sd")
    assert "<toy>" not in sd_prompt and "cat" in sd_prompt  # SD gets the description instead

    code, out, err = cli(capsys, "eval", "toy", "--images", "2", "--clip", "builtin:tiny", "--sample-steps", "2",
                         "--json")
    assert code == 0, err
    table = json.loads(out)
    assert [r["model"] for r in table["rows"]] == ["SD", "SD+TI"]
    assert table["generation"]["steps"] == 2  # --sample-steps reached the measurement
    for row in table["rows"]:
        assert 0 < row["reconstruction"] <= 1 and -1 <= row["editability"] <= 1
    report = next(Path(shared_engine_home).glob("concepts/toy/runs/*/eval/*"))
    assert (report / "table.json").is_file() and (report / "table.md").is_file()

    code, out, err = cli(capsys, "experiment", "steps", "toy", "--images", "1", "--clip", "builtin:tiny",
                         "--sample-steps", "2", "--json")
    assert code == 0, err
    curve = json.loads(out)
    assert [p["step"] for p in curve["points"]] == [5, 10]
    assert Path(curve["grid"]).is_file()


def test_job_errors_are_one_line_user_errors(shared_engine_home, image_dir, capsys):
    assert cli(capsys, "concept", "add", "untrained", "--images", str(image_dir), "--init", "cat")[0] == 0
    code, _, err = cli(capsys, "eval", "untrained", "--images", "2", "--clip", "builtin:tiny")
    assert code == 2 and "no finished" in err and err.count("\n") == 1
    code, _, err = cli(capsys, "generate", "a photo of <untrained>", "--steps", "2")
    assert code == 2 and "train" in err


def test_generate_options_size_sampler_batch(shared_engine_home, capsys):
    code, out, err = cli(capsys, "generate", "a toy", "-n", "3", "--steps", "2", "--sampler", "euler-a",
                         "--width", "64", "--height", "48", "--batch-size", "2", "--json")
    assert code == 0, err
    images = json.loads(out)
    assert len(images) == 3
    for image in images:
        png = Image.open(image["path"])
        assert png.size == (64, 48)
        assert "Sampler: Euler a" in png.text["parameters"] and "Size: 64x48" in png.text["parameters"]
        record = json.loads(Path(image["path"]).with_suffix(".json").read_text())
        assert record["sampler_name"] == "euler-a" and record["batch_size"] in (1, 2)
    jobs_before = sorted(Path(shared_engine_home).glob("jobs/*"))
    try:
        code = main(["generate", "a toy", "--width", "50"])
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and "--width must be a multiple of 8" in err
    assert sorted(Path(shared_engine_home).glob("jobs/*")) == jobs_before  # refused before submission
