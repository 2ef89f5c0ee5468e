"""Regularised inversion: each method does what it says, resumes bit-exact, and mixes in a sweep."""

from __future__ import annotations

import pytest
import torch

from engine.errors import JobCancelled
from engine.inversion.regularize import vocab_norms
from engine.inversion.train import QuietReporter, RunSlot, TrainConfig, train, train_many
from engine.sd.formats import read_embedding

METHODS = ("none", "init-l2", "norm", "directional")


def _images(image_dir):
    return sorted(image_dir.glob("*.png"))


def _cfg(**kw):
    # A large lr makes the word travel far in a few steps, so the methods' effects show.
    base = dict(token="<thing>", init="cat", steps=12, lr=5e-2, save_every=6, preview_every=0, log_every=3)
    base.update(kw)
    return TrainConfig(**base)


def _init_vector(model, word="cat"):
    table = model.text_encoder.get_input_embeddings().weight
    return table[model.tokenizer(word, add_special_tokens=False).input_ids[0]].detach().float()


class _CancelAt:
    def __init__(self, after_steps):
        self.after, self.steps, self.events = after_steps, 0, []

    def emit(self, type, **fields):
        self.events.append({"type": type, **fields})
        if type == "step":
            self.steps = fields["step"]

    def cancelled(self):
        return self.steps >= self.after


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory):
    """One 12-step run per method, same seed and data."""
    from helpers import make_images

    root = tmp_path_factory.mktemp("reg")
    images = _images(make_images(root / "images", count=3))
    out = {}
    for method in METHODS:
        reporter = QuietReporter()
        weight = 50.0 if method in ("init-l2", "norm") else 0.0
        path = train(tiny_model, _cfg(regularize=method, reg_weight=weight, seed=4), root / method, images, reporter)
        out[method] = (read_embedding(path).vectors[0], [e for e in reporter.events if e["type"] == "step"])
    return out


def test_directional_keeps_the_initializers_norm(tiny_model, trained):
    start = _init_vector(tiny_model)
    vector, steps = trained["directional"]
    assert torch.allclose(vector.norm(), start.norm(), rtol=1e-5)
    assert not torch.allclose(vector, start)  # the direction moved
    assert all(abs(e["norm"] - float(start.norm())) < 1e-4 for e in steps)


def test_init_l2_stays_nearer_the_initializer_than_none(tiny_model, trained):
    start = _init_vector(tiny_model)
    assert (trained["init-l2"][0] - start).norm() < 0.5 * (trained["none"][0] - start).norm()


def test_norm_penalty_keeps_the_norm_nearer_the_vocabulary(tiny_model, trained):
    tau = vocab_norms([(tiny_model.text_encoder, None)])[0]
    free, held = trained["none"][0].norm(), trained["norm"][0].norm()
    assert free > tau  # the plain word grows past the vocabulary's typical norm at this lr
    assert held < free


def test_step_events_carry_norm_cosine_and_penalty(trained):
    for method, (_, steps) in trained.items():
        last = steps[-1]
        assert {"norm", "cos_init", "norms", "cos_inits"} <= set(last)
        assert -1.0 <= last["cos_init"] < 1.0  # it moved
        assert ("reg" in last) == (method != "none")


@pytest.mark.parametrize("method", METHODS[1:])
def test_each_method_resumes_bit_for_bit(tiny_model, image_dir, tmp_path, method):
    images = _images(image_dir)
    cfg = dict(regularize=method, seed=9, reg_weight=5.0 if method != "directional" else 0.0)
    full = read_embedding(train(tiny_model, _cfg(**cfg), tmp_path / "full", images)).vectors
    with pytest.raises(JobCancelled):
        train(tiny_model, _cfg(**cfg), tmp_path / "cut", images, _CancelAt(after_steps=6))
    resumed = read_embedding(train(tiny_model, _cfg(**cfg), tmp_path / "cut", images)).vectors
    assert torch.equal(full, resumed)


def test_a_sweep_mixes_methods_and_each_equals_its_solo_run(tiny_model, image_dir, tmp_path):
    images = _images(image_dir)
    cfgs = [_cfg(regularize=m, seed=2, reg_weight=5.0 if m in ("init-l2", "norm") else 0.0) for m in METHODS]
    solo = [read_embedding(train(tiny_model, c, tmp_path / f"solo-{c.regularize}", images)).vectors for c in cfgs]
    slots = [RunSlot(c, tmp_path / f"batch-{c.regularize}", images) for c in cfgs]
    batched = [read_embedding(p).vectors for p in train_many(tiny_model, slots)]
    for s, b in zip(solo, batched):
        torch.testing.assert_close(s, b, rtol=1e-4, atol=1e-5)


def test_sdxl_directional_keeps_both_encoders_norms(sdxl_model, image_dir, tmp_path):
    from engine.sd.placeholder import WordLayout

    reporter = QuietReporter()
    cfg = _cfg(regularize="directional", vectors=2, init="red teapot", steps=6)
    path = train(sdxl_model, cfg, tmp_path / "xl", _images(image_dir), reporter)
    emb = read_embedding(path)
    widths = tuple(sdxl_model.info.text_widths)
    assert WordLayout(widths, 2).size == sum(b.numel() for b in emb.blocks)
    first = [e for e in reporter.events if e["type"] == "step"][0]
    last = [e for e in reporter.events if e["type"] == "step"][-1]
    for e in range(2):
        assert abs(last["norms"][e] - first["norms"][e]) < 1e-4


def test_a_method_may_carry_its_own_strength_in_a_sweep():
    """--regularize none,init-l2:0.003,init-l2:0.01: one member per entry, each with its strength."""
    from engine.errors import UserError
    from engine.settings.train import sweep_members

    members = sweep_members({"steps": 5, "reg_weight": 2.0, "regularizes": ["none", "init-l2:0.003", "norm"]})
    assert [(m["regularize"], m["reg_weight"]) for m in members] == [("none", 2.0), ("init-l2", 0.003), ("norm", 2.0)]
    [plain] = sweep_members({"regularize": "init-l2:0.01"})
    assert (plain["regularize"], plain["reg_weight"]) == ("init-l2", 0.01)
    for bad, needle in [("directional:1", "takes no strength"), ("init-l2:x", "positive number"),
                        ("init-l2:0", "positive number"), ("l1", "unknown regulariser")]:
        with pytest.raises(UserError, match=needle):
            sweep_members({"regularizes": ["none", bad]})
