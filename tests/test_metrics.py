"""CLIP metrics: hand-checked values, the paper's vs the per-image editability, Table 1 on disk."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image

from engine.errors import UserError
from engine.inversion.judge import load_clip
from engine.inversion.metrics import (
    PAPER_TABLE,
    editability_paper,
    editability_paper_per_prompt,
    editability_per_image,
    evaluate,
    reconstruction,
)
from engine.sd.formats import write_embedding
from engine.sd.generation import step_file
from engine.settings.prompts import EDIT, edit_prompts, load_prompts, synthesis_prompts, without_placeholder
from engine.store.library import Library
from engine.store.paths import atomic_write_json, home_dir

R2 = 1 / math.sqrt(2)


# --- the numbers ----------------------------------------------------------------------------------


def test_reconstruction_by_hand():
    gen = torch.tensor([[2.0, 0.0], [0.0, 3.0]])  # not unit length: the metric normalises
    train = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    # cosines: (1,0)-(1,0)=1, (1,0)-(1,1)=1/√2, (0,1)-(1,0)=0, (0,1)-(1,1)=1/√2
    assert reconstruction(gen, train) == pytest.approx((1 + R2 + 0 + R2) / 4, abs=1e-12)


def test_reconstruction_of_identical_images_is_one_and_order_free():
    same = torch.tensor([[0.3, -1.2, 0.5]]).repeat(4, 1)
    assert reconstruction(same, same[:3]) == pytest.approx(1.0, abs=1e-12)
    g = torch.Generator().manual_seed(0)
    gen, train = torch.randn(6, 8, generator=g), torch.randn(5, 8, generator=g)
    value = reconstruction(gen, train)
    assert reconstruction(gen[torch.randperm(6, generator=g)], train[torch.randperm(5, generator=g)]) == pytest.approx(
        value, abs=1e-12)
    assert reconstruction(train, gen) == pytest.approx(value, abs=1e-12)  # symmetric


def test_paper_and_per_image_editability_differ_and_match_hand_values():
    images = [torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.0, 2.0], [0.0, 1.0]])]
    texts = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # prompt 1: mean image (0.5, 0.5) -> cos with (1, 0) = 1/√2; per image (1 + 0) / 2 = 0.5
    # prompt 2: every image is (0, 1) -> both variants give 1
    assert editability_paper_per_prompt(images, texts) == pytest.approx([R2, 1.0], abs=1e-12)
    assert editability_paper(images, texts) == pytest.approx((R2 + 1) / 2, abs=1e-12)
    assert editability_per_image(images, texts) == pytest.approx((0.5 + 1) / 2, abs=1e-12)
    # Images that agree with each other: the two definitions coincide.
    same = [torch.tensor([[1.0, 1.0], [1.0, 1.0]])]
    assert editability_paper(same, texts[:1]) == pytest.approx(editability_per_image(same, texts[:1]), abs=1e-12)


def test_editability_needs_one_set_per_prompt():
    with pytest.raises(ValueError):
        editability_paper([torch.ones(2, 2)], torch.ones(2, 2))


# --- prompts --------------------------------------------------------------------------------------


def test_default_edit_prompts_and_placeholder_removal():
    for prop in ("object", "style"):
        assert len(edit_prompts(prop)) == 3 and all("{}" in p for p in EDIT[prop])
    # builtin:demo knows only its world's words: its prompts are asked in them
    for prop in ("object", "style"):
        demo = edit_prompts(prop, "builtin:demo")
        assert len(demo) == 3 and demo != edit_prompts(prop) and all(p.count("{}") == 1 for p in demo)
        assert all(p in synthesis_prompts(prop, "builtin:demo") for p in demo)
    assert without_placeholder("a {} on the beach") == "a on the beach"
    assert without_placeholder("a painting of a dog in the style of {}") == "a painting of a dog in the style of"


def test_prompts_file(tmp_path):
    good = tmp_path / "p.txt"
    good.write_text("# mine\na {} in space\n\na {} made of {{gold}}\n")
    assert load_prompts(good) == ["a {} in space", "a {} made of {{gold}}"]
    bad = tmp_path / "bad.txt"
    bad.write_text("a {} in space\na dog\n")
    with pytest.raises(UserError, match="prompt 2 .* has no {}"):
        load_prompts(bad)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# nothing\n")
    with pytest.raises(UserError, match="no prompts"):
        load_prompts(empty)
    with pytest.raises(UserError, match="not found"):
        load_prompts(tmp_path / "missing.txt")


# --- CLIP -----------------------------------------------------------------------------------------


def _pictures(n=3):
    g = torch.Generator().manual_seed(0)
    return [Image.fromarray((torch.rand(40, 40, 3, generator=g) * 255).byte().numpy()) for _ in range(n)]


def test_builtin_tiny_clip_is_deterministic_and_uses_the_real_tokenizer():
    a, b = load_clip("builtin:tiny"), load_clip("builtin:tiny")
    pics = _pictures()
    assert torch.equal(a.images(pics), b.images(pics))
    emb = a.texts(["a on the beach", "a photo"])
    assert emb.shape == (2, 32) and torch.allclose(emb.norm(dim=-1), torch.ones(2))
    ids = a.tokenizer(["a photo"])
    assert ids.shape == (1, 77) and ids[0, :3].tolist() == [49406, 320, 1125]


def test_clip_weights_load_from_a_local_file(tmp_path):
    from safetensors.torch import save_file

    source = load_clip("builtin:tiny")
    state = {k: v.clone() + 0.01 for k, v in source.model.state_dict().items()}
    save_file(state, str(tmp_path / "clip.safetensors"))
    loaded = load_clip("builtin:tiny", weights=tmp_path / "clip.safetensors")
    assert all(torch.equal(loaded.model.state_dict()[k], state[k]) for k in state)
    save_file({"nope": torch.zeros(1)}, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(UserError, match="does not fit CLIP"):
        load_clip("builtin:tiny", weights=tmp_path / "wrong.safetensors")
    with pytest.raises(UserError, match="not found"):
        load_clip("builtin:tiny", weights=tmp_path / "missing.safetensors")


def test_pickled_clip_weights_are_loaded_safely(tmp_path):
    torch.save({"state_dict": load_clip("builtin:tiny").model.state_dict()}, tmp_path / "ok.pt")
    load_clip("builtin:tiny", weights=tmp_path / "ok.pt")
    torch.save({"x": Image.new("RGB", (1, 1))}, tmp_path / "evil.pt")  # not plain tensors: refused
    with pytest.raises(UserError, match="could not be loaded safely"):
        load_clip("builtin:tiny", weights=tmp_path / "evil.pt")


def test_named_clip_without_weights_says_what_to_pass():
    with pytest.raises(UserError, match="--clip-weights PATH"):
        load_clip("ViT-B-32")
    with pytest.raises(UserError, match="unknown CLIP model"):
        load_clip("ViT-Nope")


# --- Table 1 end to end ----------------------------------------------------------------------------


@pytest.fixture
def trained(image_dir):
    """A concept with a finished run: final embedding plus checkpoints at steps 1 and 2."""
    lib = Library(home_dir())
    concept = lib.add("cat", image_dir, "cat", description="a small grey cat")
    run_dir = concept.runs_dir / "r1"
    vec = torch.randn(1, 32, generator=torch.Generator().manual_seed(0))
    write_embedding(run_dir / "learned_embeds.safetensors", vec, concept.token)
    for s in (1, 2):
        write_embedding(step_file(run_dir, s), vec * s, concept.token)
    atomic_write_json(run_dir / "run.json", {"id": "r1", "status": "done", "created": 1.0, "steps": 2})
    return lib, concept, run_dir


def test_evaluate_writes_table_1(tiny_model, trained):
    lib, concept, run_dir = trained
    seen = []
    result = evaluate(tiny_model, lib, "cat", images=2, clip="builtin:tiny", seed=5, sample_steps=2,
                      progress=lambda msg, f: seen.append(f))
    eval_dir = run_dir / "eval" / result["id"]
    assert result["dir"] == str(eval_dir)
    table = json.loads((eval_dir / "table.json").read_text())
    assert [r["model"] for r in table["rows"]] == ["SD", "SD+TI"]
    for row in table["rows"]:
        for key in ("reconstruction", "editability", "editability_per_image"):
            assert -1.0 <= row[key] <= 1.0
    assert table["prompts"] == edit_prompts("object") and len(table["per_prompt"]) == 3
    assert table["seeds"] == [5, 6] and table["images_per_set"] == 2
    assert table["clip"]["name"] == "builtin:tiny" and table["model"] == tiny_model.info.identity()
    assert (table["concept"], table["run"], table["step"], table["final"]) == ("cat", "r1", 2, True)
    assert "placeholder removed" in table["notes"]
    assert table["rendered"]["SD"][0] == "a photo of a small grey cat"
    assert table["rendered"]["SD+TI"][0] == "a photo of <cat>"
    md = (eval_dir / "table.md").read_text()
    assert "| SD+TI |" in md and "0.8077" in md and "0.5622" in md and "placeholder removed" in md
    pngs = sorted(p.relative_to(eval_dir).as_posix() for p in eval_dir.rglob("*.png"))
    assert len(pngs) == 2 * 4 * 2  # rows x (reconstruction + 3 edit prompts) x images
    assert "images/ti/reconstruction/ti-0005.png" in pngs and "images/sd/edit-3/sd-0006.png" in pngs
    assert all((eval_dir / p).with_suffix(".json").is_file() for p in pngs)
    assert seen == sorted(seen) and seen[-1] == 1.0
    assert PAPER_TABLE["SD+TI"] == (0.8077, 0.1611)

    # The numbers follow from the saved images.
    clip = load_clip("builtin:tiny")

    def embs(folder):
        return clip.images([Image.open(p).convert("RGB") for p in sorted((eval_dir / "images" / folder).glob("*.png"))])

    train = clip.images([Image.open(p).convert("RGB") for p in concept.images])
    ti = table["rows"][1]
    assert ti["reconstruction"] == pytest.approx(reconstruction(embs("ti/reconstruction"), train), abs=1e-6)
    texts = clip.texts([without_placeholder(p) for p in result["prompts"]])
    sets = [embs(f"ti/edit-{i}") for i in (1, 2, 3)]
    assert ti["editability"] == pytest.approx(editability_paper(sets, texts), abs=1e-6)
    assert ti["editability_per_image"] == pytest.approx(editability_per_image(sets, texts), abs=1e-6)


def test_evaluate_a_checkpoint_with_own_prompts(tiny_model, trained, tmp_path):
    lib, _, _ = trained
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a {} in space\n")
    result = evaluate(tiny_model, lib, "cat", run_id="r1", step=1, images=1, prompts_file=prompts,
                      clip="builtin:tiny", sample_steps=1)
    assert result["prompts"] == ["a {} in space"] and result["step"] == 1 and not result["final"]
    assert result["clip_texts"] == ["a in space"]
    with pytest.raises(UserError, match="no embedding at step 9"):
        evaluate(tiny_model, lib, "cat", step=9, images=1, clip="builtin:tiny")
