"""See the vector (concept inspect) and mix words (merge): through the CLI and the real engine."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from engine.sd.formats import read_embedding
from tistudio.cli import main

pytestmark = pytest.mark.timeout(600)


def cli(capsys, *argv):
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def _home() -> Path:
    return Path(os.environ["TISTUDIO_HOME"])


@pytest.fixture(scope="module")
def two_runs(_module_home, tmp_path_factory):
    """Two 4-step runs of one concept (seeds 1 and 2), trained once, by the module's engine, for
    the module's tests (which read them and add concepts of their own)."""
    import contextlib
    import io

    from helpers import make_images

    def quiet_cli(*argv):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(argv))
        return code, out.getvalue(), err.getvalue()

    images = make_images(tmp_path_factory.mktemp("images"), count=3)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TISTUDIO_HOME", str(_module_home))
        mp.setenv("TISTUDIO_CONFIG_DIR", str(tmp_path_factory.mktemp("config")))
        mp.setenv("TISTUDIO_MODEL", "builtin:tiny")
        mp.setenv("TISTUDIO_ENGINE_IDLE", "60")
        assert quiet_cli("concept", "add", "toy", "--images", str(images), "--init", "cat")[0] == 0
        for seed in (1, 2):
            code, _, err = quiet_cli("train", "toy", "--steps", "4", "--lr", "5e-2", "--seed", str(seed),
                                     "--save-every", "2", "--preview-every", "0")
            assert code == 0, err
        return sorted(r["id"] for r in json.loads(quiet_cli("runs", "--json")[1]) if r["kind"] == "train")


@pytest.fixture(autouse=True)
def _in_the_module_home(shared_engine_home):
    """Every test here talks to the module's engine and library."""


def test_inspect_reports_norms_cosines_neighbours_and_compares_runs(two_runs, capsys, tiny_model):
    code, out, err = cli(capsys, "concept", "inspect", "toy", "--top", "5", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["run"] == two_runs[-1] and report["final"] and report["vectors"] == 1
    [encoder] = report["encoders"]
    assert encoder["width"] == tiny_model.info.text_widths[0]
    vocab = encoder["vocab"]
    assert vocab["p05"] <= vocab["median"] <= vocab["p95"] <= vocab["max"]
    [vector] = encoder["vectors"]
    word = read_embedding(Path(_home(), "concepts", "toy", "runs", two_runs[-1], "learned_embeds.safetensors"))
    assert vector["norm"] == pytest.approx(float(word.vectors[0].norm()), rel=1e-5)
    table = tiny_model.text_encoder.get_input_embeddings().weight.float()
    cat = tiny_model.tokenizer("cat", add_special_tokens=False).input_ids[0]
    expected = torch.nn.functional.cosine_similarity(word.vectors[0], table[cat], dim=0)
    assert vector["init_token"] == "cat" and vector["cos_init"] == pytest.approx(float(expected), abs=1e-5)
    assert len(vector["nearest"]) == 5 and vector["nearest"][0]["cos"] >= vector["nearest"][-1]["cos"]
    assert 0 <= vector["norm_percentile"] <= 100
    runs = report["runs"]
    assert runs["ids"] == two_runs and runs["cosine"][0][0] == pytest.approx(1.0)
    assert runs["cosine"][0][1] == pytest.approx(runs["cosine"][1][0]) and runs["cosine"][0][1] < 1.0

    code, out, err = cli(capsys, "concept", "inspect", f"toy@{two_runs[0]}:2")
    assert code == 0, err
    assert f"toy@{two_runs[0]} (step 2)" in out and "nearest:" in out and "cosine between their words" in out
    code, _, err = cli(capsys, "concept", "inspect", f"toy@{two_runs[0]}:3")
    assert code == 2 and "no embedding at step 3" in err


def test_merge_mixes_and_concatenates_words_into_a_usable_concept(two_runs, capsys):
    a, b = (f"toy@{r}" for r in two_runs)
    code, out, err = cli(capsys, "merge", a, b, "--weights", "0.75,0.25", "--name", "blend", "--json")
    assert code == 0, err
    made = json.loads(out)
    assert made["name"] == "blend" and made["vectors"] == 1
    words = [read_embedding(Path(_home(), "concepts", "toy", "runs", r, "learned_embeds.safetensors")).vectors
             for r in two_runs]
    blend = read_embedding(Path(_home(), "concepts", "blend", "runs", made["run"], "learned_embeds.safetensors"))
    torch.testing.assert_close(blend.vectors, 0.75 * words[0] + 0.25 * words[1])

    code, out, err = cli(capsys, "merge", a, b, "--concat", "--name", "both", "--json")
    assert code == 0, err
    both = read_embedding(Path(_home(), "concepts", "both", "runs", json.loads(out)["run"],
                               "learned_embeds.safetensors"))
    assert torch.equal(both.vectors, torch.cat(words))

    code, out, err = cli(capsys, "generate", "a photo of <blend> and <both>", "-n", "1", "--steps", "1", "--json")
    assert code == 0, err  # a merged word is used like any other
    code, _, err = cli(capsys, "merge", a, "toy", "both", "--name", "bad")
    assert code == 2 and "one size" in err and "--concat" in err
    code, _, err = cli(capsys, "merge", a, b, "--weights", "1", "--name", "bad2")
    assert code == 2 and "--weights needs 2 numbers" in err
    assert not (_home() / "concepts" / "bad").exists() and not (_home() / "concepts" / "bad2").exists()
