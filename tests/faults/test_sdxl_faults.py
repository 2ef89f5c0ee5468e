"""kill -9 during an SDXL run of a 2-vector word, through the real engine: resume ends bit for bit
where an uninterrupted run ends (both encoders' blocks)."""

from __future__ import annotations

import pytest
import torch

from engine.sd.formats import read_embedding
from engine.store.library import Library
from engine.wire.client import call
from faults.test_faults import assert_nothing_partial

pytestmark = pytest.mark.timeout(600)

PARAMS = {"steps": 9, "save_every": 3, "preview_every": 0, "log_every": 3, "seed": 2, "vectors": 2,
          "model": "builtin:sdxl-tiny"}


def test_sdxl_kill_9_mid_run_then_resume_is_bit_exact(engine_home, image_dir, sdxl_model, tmp_path, monkeypatch):
    from engine.inversion.train import TrainConfig, train
    from engine.sd.models import load_tokenizer

    concept = Library(engine_home).add("toy", image_dir, "cat", tokenizer=load_tokenizer("builtin:sdxl-tiny"))
    settings = {k: v for k, v in PARAMS.items() if k != "model"}
    expected = read_embedding(train(sdxl_model, TrainConfig(token=concept.token, init="cat", **settings),
                                    tmp_path / "ref", concept.images))
    monkeypatch.setenv("TISTUDIO_FAULTS", "checkpoint.mid_write@6")
    monkeypatch.setenv("TISTUDIO_FAULTS_STATE", str(tmp_path / "faults"))
    run_id = call("submit", "train", concept="toy", params=PARAMS, home=engine_home)
    kills = 0
    while call("wait", run_id, home=engine_home) == "interrupted":
        kills += 1
        assert kills <= 3
        assert_nothing_partial(engine_home)
        call("submit", resume=run_id, home=engine_home)
    assert kills == 1
    run = next(j for j in call("jobs", home=engine_home) if j["id"] == run_id)
    assert run["status"] == "done"
    got = read_embedding(run["embedding"])
    assert got.widths == (32, 64) and got.num_vectors == 2
    assert all(torch.equal(a, b) for a, b in zip(got.blocks, expected.blocks))
