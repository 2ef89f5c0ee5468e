"""Cross-initialisation (--init-mode cross, Pang et al. 2024): the start is the text encoder's output for
the initializer, the pull back to it is their unsquared L2, resume is bit-exact, and it mixes in sweeps."""

from __future__ import annotations

import pytest
import torch

from engine.errors import JobCancelled, UserError
from engine.inversion.train import Inversion, QuietReporter, RunSlot, TrainConfig, train, train_many
from engine.sd.formats import read_embedding
from engine.settings.train import CROSS_WEIGHT, method_label, parse_method, sweep_members


def _cfg(**kw):
    base = dict(token="<thing>", init="cat", steps=8, lr=5e-2, save_every=4, preview_every=0, log_every=2,
                init_mode="cross", probe_every=0, dloss_every=0)
    base.update(kw)
    return TrainConfig(**base)


def _images(image_dir):
    return sorted(image_dir.glob("*.png"))


def _encoder_output(model, text: str, positions: list[int], which: int = 0, penultimate: bool = False):
    """What the model's own tokenizer and encoder make of `text`, at `positions` (plain transformers calls)."""
    encoder, tokenizer = model.encoders[which]
    ids = tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    out = encoder(ids, output_hidden_states=True)
    states = out.hidden_states[-2] if penultimate else out[0]
    return states[0, positions].detach().float()


@pytest.mark.parametrize("init,vectors,positions", [("cat", 1, [1]), ("red teapot", 2, [1, 2]), ("cat", 2, [1, 1])])
def test_the_start_is_the_text_encoders_output_for_the_initializer(tiny_model, image_dir, tmp_path, init, vectors,
                                                                   positions):
    inversion = Inversion(tiny_model, [RunSlot(_cfg(init=init, vectors=vectors), tmp_path / "r", _images(image_dir))])
    expected = _encoder_output(tiny_model, init, positions)
    assert torch.equal(inversion.init_rows[0].view(vectors, -1), expected)
    table = tiny_model.text_encoder.get_input_embeddings().weight
    token = tiny_model.tokenizer(init, add_special_tokens=False).input_ids[0]
    assert not torch.allclose(expected[0], table[token].float())  # not the input row (token mode's start)


def test_sdxl_starts_each_encoder_from_its_penultimate_output(sdxl_model, image_dir, tmp_path):
    """SDXL's UNet reads both encoders' penultimate states: cross-initialisation starts there."""
    inversion = Inversion(sdxl_model, [RunSlot(_cfg(), tmp_path / "r", _images(image_dir))])
    blocks = inversion.layout.split(inversion.init_rows[0])
    for e in range(2):
        assert torch.equal(blocks[e], _encoder_output(sdxl_model, "cat", [1], which=e, penultimate=True))


def test_the_pull_is_the_papers_unsquared_distance(tiny_model, image_dir, tmp_path):
    """penalty = w * mean over vectors of |v - v_cross| (their F.pairwise_distance, eps 1e-6), w 1e-5 by default."""
    slots = [RunSlot(_cfg(vectors=2, init="red teapot", init_mode=mode), tmp_path / mode, _images(image_dir))
             for mode in ("cross", "token")]
    inversion = Inversion(tiny_model, slots)
    assert inversion.regularizer.weights[:, 2].tolist() == pytest.approx([CROSS_WEIGHT, 0.0])
    moved = inversion.init_rows.clone()
    moved[:, :32] += 3.0  # vector 0 of each run moves by 3 in every coordinate
    expected = CROSS_WEIGHT * (torch.full((32,), 3.0 + 1e-6).norm() + torch.full((32,), 1e-6).norm()) / 2
    penalty = inversion.regularizer.penalty(moved)
    assert penalty[0].item() == pytest.approx(expected.item(), rel=1e-5) and penalty[1].item() == 0.0


def test_cross_resumes_bit_for_bit_and_batches_with_token_runs(tiny_model, image_dir, tmp_path):
    images = _images(image_dir)
    full = read_embedding(train(tiny_model, _cfg(seed=5, cross_weight=0.01), tmp_path / "full", images)).vectors

    class CancelAt(QuietReporter):
        def cancelled(self):
            return any(e["type"] == "step" and e["step"] >= 4 for e in self.events)

    with pytest.raises(JobCancelled):
        train(tiny_model, _cfg(seed=5, cross_weight=0.01), tmp_path / "cut", images, CancelAt())
    resumed = read_embedding(train(tiny_model, _cfg(seed=5, cross_weight=0.01), tmp_path / "cut", images)).vectors
    assert torch.equal(full, resumed)
    slots = [RunSlot(_cfg(seed=5, cross_weight=0.01), tmp_path / "b-cross", images),
             RunSlot(_cfg(seed=5, init_mode="token"), tmp_path / "b-token", images)]
    batched = [read_embedding(p).vectors for p in train_many(tiny_model, slots)]
    torch.testing.assert_close(batched[0], full, rtol=1e-4, atol=1e-5)  # beside a token run, as alone


def test_methods_name_cross_and_per_layer():
    """`cross`, `cross:W`, `per-layer` and parts joined with + are methods of a sweep, read back by method_label."""
    members = sweep_members({"seeds": [0, 1], "regularizes": ["none", "cross", "cross:0.001+per-layer",
                                                               "init-l2:0.01+per-layer"]})
    assert [(m["seed"], method_label(m)) for m in members] == [
        (0, "none"), (0, "cross"), (0, "cross:0.001+per-layer"), (0, "init-l2:0.01+per-layer"),
        (1, "none"), (1, "cross"), (1, "cross:0.001+per-layer"), (1, "init-l2:0.01+per-layer")]
    assert members[2]["init_mode"] == "cross" and members[2]["cross_weight"] == 0.001 and members[2]["per_layer"]
    assert parse_method("cross") == {"regularize": "none", "init_mode": "cross"}
    for bad, needle in [("cross+cross", "at most one regulariser"), ("norm+directional", "at most one"),
                        ("per-layer:2", "takes no strength"), ("cross:-1", "positive number")]:
        with pytest.raises(UserError, match=needle):
            parse_method(bad)
    for settings, needle in [(dict(init_mode="crossed"), "--init-mode must be one of token, cross"),
                             (dict(cross_weight=-1.0), "--cross-weight must be 0"),
                             (dict(init_from="x.pt"), "--init-mode cross starts from"),
                             (dict(per_layer=True, compile="default"), "drop --compile")]:
        with pytest.raises(UserError, match=needle):
            _cfg(**settings).validate()
