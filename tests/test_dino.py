"""DINO beside CLIP (--dino): a reconstruction column from a ViT in the Hugging Face cache, DreamBooth's
metric recomputed from the images Table 1 saved; a model not in the cache is refused in one line."""

from __future__ import annotations

import json

import pytest
import torch

from engine.errors import UserError
from engine.inversion.dino import TINY_VIT, build_dino, prepare_dino
from engine.inversion.metrics import evaluate, reconstruction
from engine.inversion.train import TrainConfig, train
from engine.store.library import Library
from engine.store.paths import atomic_write_json, home_dir


@pytest.fixture
def cached_dino(tmp_path, monkeypatch) -> str:
    """A random-weight ViT written into a Hugging Face cache as the hub lays a snapshot out."""
    from transformers import ViTConfig, ViTModel

    cache = tmp_path / "hf-cache"
    snapshot = cache / "models--test--dino-tiny" / "snapshots" / ("0" * 40)
    torch.manual_seed(1)
    ViTModel(ViTConfig(**TINY_VIT), add_pooling_layer=False).save_pretrained(snapshot)
    (snapshot / "preprocessor_config.json").write_text(json.dumps(
        {"size": 32, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}))
    (cache / "models--test--dino-tiny" / "refs").mkdir()
    (cache / "models--test--dino-tiny" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    return "test/dino-tiny"


def test_table_1_gains_a_dino_column_recomputable_from_its_images(tiny_model, image_dir, cached_dino, tmp_path):
    library = Library(home_dir())
    concept = library.add("cat", image_dir, "cat", description="a small grey cat")
    train(tiny_model, TrainConfig(token=concept.token, init="cat", steps=2, save_every=2, preview_every=0,
                                  probe_every=0), concept.runs_dir / "r1", concept.images)
    atomic_write_json(concept.runs_dir / "r1" / "run.json", {"id": "r1", "kind": "train", "status": "done",
                                                             "created": 1.0})
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a {} on a beach\n")
    table = evaluate(tiny_model, library, "cat", "r1", images=2, prompts_file=prompts, clip="builtin:tiny",
                     sample_steps=2, dino=cached_dino)
    assert table["dino"]["name"] == "test/dino-tiny" and "mean (0.5, 0.5, 0.5)" in table["dino"]["preprocess"]
    model = build_dino(prepare_dino(cached_dino), "cpu")
    train_embs = model.images(concept.images)
    for row, folder in zip(table["rows"], ("sd", "ti")):
        generated = sorted((concept.runs_dir / "r1" / "eval" / table["id"] / "images" / folder /
                            "reconstruction").glob("*.png"))
        assert row["dino"] == pytest.approx(reconstruction(model.images(generated), train_embs), abs=1e-6)
    markdown = (concept.runs_dir / "r1" / "eval" / table["id"] / "table.md").read_text()
    assert "DINO recon." in markdown and "DreamBooth" in markdown


def test_a_dino_model_not_in_the_cache_is_refused_in_one_line(tmp_path, monkeypatch, capsys, image_dir):
    from tistudio.cli import main

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(UserError, match=r"^--dino facebook/dino-vits16: not in the Hugging Face cache; download it "
                                        r"first \(`hf download facebook/dino-vits16`\), or leave --dino out$"):
        prepare_dino("facebook/dino-vits16")
    assert main(["concept", "add", "toy", "--images", str(image_dir), "--init", "cat"]) == 0
    code = main(["experiment", "regularize", "toy", "--methods", "none", "--dino", "facebook/dino-vits16"])
    err = capsys.readouterr().err
    assert code == 2 and "not in the Hugging Face cache" in err and len(err.strip().splitlines()) == 1
    assert not (home_dir() / "engine").exists()  # nothing was submitted: no engine was even started
