"""Words of N vectors (--vectors): every vector trains, every file and prompt carries all N."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.errors import JobCancelled, UserError
from engine.inversion.train import (
    Inversion,
    QuietReporter,
    RunSlot,
    TrainConfig,
    train,
    train_many,
)
from engine.sd.formats import read_embedding, write_embedding
from engine.sd.generation import (
    GenerateRequest,
    generate,
    generation_scheduler,
    render,
    resolve_embeddings,
)
from engine.store import checkpoints
from engine.store.library import Library, initializer_ids
from engine.store.paths import atomic_write_json, home_dir

PROMPT = "a photo of <cat> on the beach"


def _images(image_dir):
    return sorted(image_dir.glob("*.png"))


def _cfg(**kw):
    base = {"token": "<thing>", "init": "cat", "steps": 12, "save_every": 6, "preview_every": 0, "log_every": 3,
            "vectors": 3}
    return TrainConfig(**{**base, **kw})


def _row(model, word, encoder=0):
    text_encoder, tokenizer = model.encoders[encoder]
    [token_id] = tokenizer(word, add_special_tokens=False).input_ids
    return text_encoder.get_input_embeddings().weight[token_id].float()


# --- the initializer -------------------------------------------------------------------------------


def test_initializer_is_a_word_repeated_or_a_phrase_of_n_tokens(tiny_model):
    tok = tiny_model.tokenizer
    red, teapot = (tok(w, add_special_tokens=False).input_ids[0] for w in ("red", "teapot"))
    assert initializer_ids(tok, "red teapot", 2) == [red, teapot]
    assert initializer_ids(tok, "red", 3) == [red] * 3
    assert initializer_ids(tok, "red", 1) == [red]
    with pytest.raises(UserError, match="2 tokens .* but --vectors is 3"):
        initializer_ids(tok, "red teapot", 3)
    with pytest.raises(UserError, match="single"):
        initializer_ids(tok, "red teapot", 1)


def test_phrase_initializer_starts_each_vector_from_its_token(tiny_model, image_dir, tmp_path):
    inv = Inversion(tiny_model, [RunSlot(_cfg(vectors=2, init="red teapot"), tmp_path / "r", _images(image_dir))])
    [block] = inv.layout.split(inv.vectors.detach()[0])
    assert torch.equal(block[0], _row(tiny_model, "red")) and torch.equal(block[1], _row(tiny_model, "teapot"))
    # the prompts hold the word's N slots, side by side
    assert inv.words[0] == "<tistudio-slot-0> <tistudio-slot-1>"


# --- training -------------------------------------------------------------------------------------


def test_every_vector_moves_and_nothing_else(tiny_model, image_dir, tmp_path):
    """A known bug in peers trained only the first of N vectors; here each one must move, on its own."""
    before = {k: v.clone() for k, v in tiny_model.text_encoder.state_dict().items()}
    out = train(tiny_model, _cfg(lr=5e-2), tmp_path / "run", _images(image_dir))
    learned = read_embedding(out)
    assert learned.vectors.shape == (3, 32)
    start = _row(tiny_model, "cat")
    moved = (learned.vectors - start).abs().amax(dim=1)
    assert (moved > 1e-3).all(), moved
    # not one vector copied three times: each slot got its own gradient
    assert not torch.allclose(learned.vectors[0], learned.vectors[1])
    assert not torch.allclose(learned.vectors[1], learned.vectors[2])
    after = tiny_model.text_encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_every_vector_moves_in_both_sdxl_encoders(sdxl_model, image_dir, tmp_path):
    out = train(sdxl_model, _cfg(vectors=2, lr=5e-2, steps=6, save_every=6), tmp_path / "run", _images(image_dir))
    learned = read_embedding(out)
    assert learned.widths == (32, 64) and learned.num_vectors == 2
    for e, block in enumerate(learned.blocks):
        moved = (block - _row(sdxl_model, "cat", e)).abs().amax(dim=1)
        assert (moved > 1e-3).all(), (e, moved)


class _CancelAt(QuietReporter):
    def __init__(self, after_steps):
        super().__init__()
        self.after = after_steps

    def cancelled(self):
        return sum(1 for e in self.events if e["type"] == "step") * 3 >= self.after


@pytest.mark.parametrize("which", ["tiny", "sdxl"])
def test_resume_with_n_vectors_is_bit_exact(which, tiny_model, sdxl_model, image_dir, tmp_path):
    model = tiny_model if which == "tiny" else sdxl_model
    images = _images(image_dir)
    cfg = {"vectors": 2, "seed": 4}
    full = read_embedding(train(model, _cfg(**cfg), tmp_path / "full", images))
    with pytest.raises(JobCancelled):
        train(model, _cfg(**cfg), tmp_path / "cut", images, _CancelAt(after_steps=6))
    assert checkpoints.latest(tmp_path / "cut").step == 6
    resumed = read_embedding(train(model, _cfg(**cfg), tmp_path / "cut", images))
    assert all(torch.equal(a, b) for a, b in zip(full.blocks, resumed.blocks))


def test_resume_with_another_vectors_setting_is_refused(tiny_model, image_dir, tmp_path):
    images = _images(image_dir)
    with pytest.raises(JobCancelled):
        train(tiny_model, _cfg(vectors=2), tmp_path / "run", images, _CancelAt(after_steps=6))
    with pytest.raises(UserError, match="--vectors"):
        train(tiny_model, _cfg(vectors=3), tmp_path / "run", images)


def test_batched_runs_of_n_vectors_equal_their_solo_runs(sdxl_model, image_dir, tmp_path):
    """K runs x N slots in one UNet call: each run ends where its solo run would."""
    images = _images(image_dir)
    cfgs = [_cfg(vectors=2, seed=1, steps=4), _cfg(vectors=2, seed=2, steps=4, init="red teapot")]
    solo = [read_embedding(train(sdxl_model, c, tmp_path / f"solo{i}", images)) for i, c in enumerate(cfgs)]
    batched = [read_embedding(p) for p in train_many(sdxl_model, [RunSlot(c, tmp_path / f"b{i}", images)
                                                                   for i, c in enumerate(cfgs)])]
    for s, b in zip(solo, batched):
        for x, y in zip(s.blocks, b.blocks):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


# --- generation ---------------------------------------------------------------------------------------


@pytest.fixture
def library(image_dir):
    lib = Library(home_dir())
    lib.add("cat", image_dir, "cat", description="a small grey cat")
    return lib


def _done_run(concept, run_id, blocks):
    run_dir = concept.runs_dir / run_id
    fmt = "diffusers" if len(blocks) == 1 else "kohya"
    write_embedding(run_dir / "learned_embeds.safetensors", tuple(blocks), concept.token, fmt)
    atomic_write_json(run_dir / "run.json", {"id": run_id, "status": "done", "created": 1.0, "steps": 10})
    return run_dir / "learned_embeds.safetensors"


def test_n_vector_images_equal_diffusers_load_textual_inversion(tiny_model, library):
    """diffusers registers tok, tok_1, tok_2 and expands tok in prompts; our images are the same, bit for bit."""
    from diffusers import StableDiffusionPipeline

    concept = library.get("cat")
    vectors = torch.randn(3, 32, generator=torch.Generator().manual_seed(5)) * 3
    path = _done_run(concept, "r1", [vectors])
    ours = render(tiny_model, PROMPT, [3, 4], steps=2, batch_size=2, output_type="np",
                  used=resolve_embeddings(library, PROMPT, []))
    components = {**tiny_model.pipe.components, "scheduler": generation_scheduler(tiny_model),
                  "tokenizer": copy.deepcopy(tiny_model.tokenizer),
                  "text_encoder": copy.deepcopy(tiny_model.text_encoder)}
    ref = StableDiffusionPipeline(**components)
    ref.set_progress_bar_config(disable=True)
    ref.load_textual_inversion(str(path), token=concept.token)
    ids = ref.tokenizer.convert_tokens_to_ids(["<cat>", "<cat>_1", "<cat>_2"])
    assert torch.equal(ref.text_encoder.get_input_embeddings().weight[ids], vectors)
    theirs = ref(PROMPT, num_images_per_prompt=2, num_inference_steps=2, output_type="np", height=64, width=64,
                 generator=[torch.Generator().manual_seed(s) for s in (3, 4)]).images
    assert np.array_equal(np.stack(ours), theirs)
    # and all three vectors matter: changing the last one changes the image
    changed = vectors.clone()
    changed[2] += 5
    _done_run(concept, "r2", [changed])
    other = render(tiny_model, PROMPT, [3], steps=2, output_type="np",
                   used=resolve_embeddings(library, PROMPT, ["cat@r2"]))
    assert not np.array_equal(other[0], ours[0])


def test_sdxl_generation_with_an_n_vector_word_writes_images(sdxl_model, library):
    concept = library.get("cat")
    g = torch.Generator().manual_seed(6)
    _done_run(concept, "r1", [torch.randn(2, 32, generator=g), torch.randn(2, 64, generator=g)])
    results = generate(sdxl_model, library, GenerateRequest(PROMPT, n=1, steps=2, mode="compare",
                                                            out_dir=home_dir() / "out"))
    assert [r["mode"] for r in results] == ["sd", "ti"]
    with Image.open(results[1]["path"]) as im:
        assert im.size == (64, 64)
    record = json.loads(Path(results[1]["json"]).read_text())
    assert record["model"]["family"] == "sdxl" and record["embeddings"][0]["vectors"] == 2
