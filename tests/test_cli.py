"""The headless CLI for the library and embeddings: success paths, and every bad input
gives exit 2, one line on stderr, and leaves the library untouched."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.sd.formats import write_embedding
from helpers import make_images
from tistudio.cli import main


def _tree(root: Path) -> list[tuple[str, int]]:
    if not root.exists():
        return []
    return sorted((str(p.relative_to(root)), p.stat().st_size if p.is_file() else -1) for p in root.rglob("*"))


def _home() -> Path:
    return Path(os.environ["TISTUDIO_HOME"])


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def concept(capsys, image_dir):
    code, _, err = run_cli(capsys, "concept", "add", "toy", "--images", str(image_dir), "--init", "cat")
    assert code == 0, err
    return "toy"


def test_concept_add_list_show_rm(capsys, concept):
    code, out, _ = run_cli(capsys, "concept", "list", "--json")
    assert code == 0
    [row] = json.loads(out)
    assert {k: row[k] for k in ("name", "token", "init", "property", "description", "images")} == {
        "name": "toy", "token": "<toy>", "init": "cat", "property": "object", "description": "cat", "images": 3}
    code, out, _ = run_cli(capsys, "concept", "show", "toy", "--json")
    assert code == 0 and len(json.loads(out)["image_files"]) == 3
    code, _, err = run_cli(capsys, "concept", "rm", "toy")
    assert code == 2 and "--yes" in err
    assert run_cli(capsys, "concept", "rm", "toy", "--yes")[0] == 0
    assert json.loads(run_cli(capsys, "concept", "list", "--json")[1]) == []


def _bad_image_dir(tmp_path: Path, kind: str) -> Path:
    folder = make_images(tmp_path / f"bad-{kind}", count=2)
    if kind == "not-image":
        (folder / "fake.png").write_text("hello")
    elif kind == "small":
        from PIL import Image

        Image.new("RGB", (40, 30)).save(folder / "small.png")
    elif kind == "empty":
        for p in folder.iterdir():
            p.unlink()
    return folder


@pytest.mark.parametrize(
    "argv_tail, needle",
    [
        (["a/b", "--init", "cat"], "slash"),
        (["..", "--init", "cat"], "name"),
        (["ok", "--init", "photosynthesis"], "single"),
        (["ok", "--init", "cat", "--token", "dog"], "already"),
        (["ok", "--init", "two words"], "single word"),
        (["ok\x07", "--init", "cat"], "control"),
        (["x" * 1000, "--init", "cat"], "at most 64"),
    ],
)
def test_concept_add_bad_input(capsys, image_dir, argv_tail, needle):
    code, out, err = run_cli(capsys, "concept", "add", argv_tail[0], "--images", str(image_dir), *argv_tail[1:])
    assert code == 2
    assert err.startswith("tistudio: error:") and err.count("\n") == 1, err
    assert needle in err.lower()
    assert _tree(_home() / "concepts") == []


@pytest.mark.parametrize("kind, needle", [("not-image", "fake.png"), ("small", "small.png"), ("empty", "no images")])
def test_concept_add_bad_images(capsys, tmp_path, kind, needle):
    folder = _bad_image_dir(tmp_path, kind)
    code, _, err = run_cli(capsys, "concept", "add", "toy", "--images", str(folder), "--init", "cat")
    assert code == 2 and needle in err and err.count("\n") == 1, err
    assert _tree(_home() / "concepts") == []


def test_missing_images_folder_and_unknown_concept(capsys, tmp_path):
    code, _, err = run_cli(capsys, "concept", "add", "toy", "--images", str(tmp_path / "nope"), "--init", "cat")
    assert code == 2 and "nope" in err
    code, _, err = run_cli(capsys, "concept", "show", "ghost")
    assert code == 2 and "ghost" in err


def test_no_traceback_in_a_real_process(tmp_path, image_dir):
    env = {**os.environ, "TISTUDIO_HOME": str(tmp_path / "h")}
    proc = subprocess.run([sys.executable, "-m", "tistudio.cli", "concept", "add", "a/b", "--images",
                           str(image_dir), "--init", "cat"], capture_output=True, text=True, env=env)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
    proc = subprocess.run([sys.executable, "-m", "tistudio.cli", "concept", "bogus"], capture_output=True,
                          text=True, env=env)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1


# --- embeddings: import and export ---------------------------------------------------------


def _vector(width=32, n=1, seed=0):
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


def test_import_then_export_diffusers_loads_in_diffusers_bit_for_bit(capsys, tmp_path, tiny_model):
    vec = _vector()
    src = write_embedding(tmp_path / "in.safetensors", vec, "<shiny>", "diffusers")
    code, out, err = run_cli(capsys, "import", str(src), "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["name"] == "shiny" and info["token"] == "<shiny>" and info["images"] == 0
    out_file = tmp_path / "out.safetensors"
    assert run_cli(capsys, "export", "shiny", "--format", "diffusers", "--out", str(out_file))[0] == 0

    import copy

    from diffusers import StableDiffusionPipeline

    # diffusers' own loader, on copies: it resizes the token table of what it is given
    pipe = StableDiffusionPipeline(**{**tiny_model.pipe.components,
                                      "text_encoder": copy.deepcopy(tiny_model.text_encoder),
                                      "tokenizer": copy.deepcopy(tiny_model.tokenizer)})
    pipe.load_textual_inversion(str(out_file))
    token_id = pipe.tokenizer.convert_tokens_to_ids("<shiny>")
    loaded = pipe.text_encoder.get_input_embeddings().weight[token_id]
    assert torch.equal(loaded, vec[0])


@pytest.mark.parametrize("fmt, suffix", [("a1111", ".pt"), ("kohya", ".safetensors")])
def test_exports_round_trip_through_import(capsys, tmp_path, fmt, suffix):
    vec = _vector(n=2, seed=3)
    src = write_embedding(tmp_path / "in.safetensors", vec, "<orig>", "diffusers")
    assert run_cli(capsys, "import", str(src), "--name", "orig")[0] == 0
    out_file = tmp_path / f"exported{suffix}"
    assert run_cli(capsys, "export", "orig", "--format", fmt, "--out", str(out_file))[0] == 0
    code, _, err = run_cli(capsys, "import", str(out_file), "--name", "again", "--token", "<again>")
    assert code == 0, err
    from engine.sd.generation import load_used
    from engine.store.library import Library

    again = load_used(Library(_home()).get("again")).vectors
    assert torch.equal(again, vec)


def test_export_refuses_to_overwrite_without_force(capsys, tmp_path):
    src = write_embedding(tmp_path / "in.safetensors", _vector(), "<e>", "diffusers")
    run_cli(capsys, "import", str(src), "--name", "e")
    out_file = tmp_path / "exists.safetensors"
    out_file.write_text("precious")
    code, _, err = run_cli(capsys, "export", "e", "--out", str(out_file))
    assert code == 2 and "--force" in err and out_file.read_text() == "precious"


def test_old_1d_diffusers_file_imports(capsys, tmp_path):
    from safetensors.torch import save_file

    vec = _vector()[0]
    save_file({"<old>": vec}, str(tmp_path / "old.safetensors"))
    assert run_cli(capsys, "import", str(tmp_path / "old.safetensors"))[0] == 0
    from engine.sd.generation import load_used
    from engine.store.library import Library

    assert torch.equal(load_used(Library(_home()).get("old")).vectors, vec[None])


def test_import_wrong_width_names_both_and_writes_nothing(capsys, tmp_path):
    src = write_embedding(tmp_path / "wide.safetensors", _vector(width=768), "<wide>", "diffusers")
    code, _, err = run_cli(capsys, "import", str(src))
    assert code == 2 and "768" in err and "32" in err and err.count("\n") == 1
    assert _tree(_home() / "concepts") == []


def test_import_refuses_malicious_pickle(capsys, tmp_path):
    import pickle

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "evil.pt"
    bad.write_bytes(pickle.dumps({"string_to_param": Evil()}, protocol=2))
    code, _, err = run_cli(capsys, "import", str(bad))
    assert code == 2 and not marker.exists()
    assert _tree(_home() / "concepts") == []


def test_export_without_runs_is_a_user_error(capsys, image_dir, concept, tmp_path):
    code, _, err = run_cli(capsys, "export", "toy", "--out", str(tmp_path / "x.safetensors"))
    assert code == 2 and "train" in err


# --- model specs -----------------------------------------------------------------------------


def test_model_dir_from_save_pretrained(capsys, tmp_path, tiny_model, image_dir):
    from engine.sd.models import load_model

    folder = tmp_path / "pipe"
    tiny_model.pipe.save_pretrained(folder)
    loaded = load_model(str(folder))
    assert loaded.info.kind == "diffusers" and loaded.info.family == "sd1" and loaded.info.text_width == 32
    for a, b in zip(loaded.unet.parameters(), tiny_model.unet.parameters()):
        assert torch.equal(a, b)
    code, _, err = run_cli(capsys, "--model", str(folder), "concept", "add", "toy", "--images", str(image_dir),
                           "--init", "dog")
    assert code == 0, err


def test_model_spec_errors(capsys, tmp_path, image_dir):
    (tmp_path / "xl").mkdir()
    (tmp_path / "xl" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    for spec, needle in [(str(tmp_path / "xl"), "SDXL"), ("builtin:nope", "built-in"),
                         (str(tmp_path / "missing.safetensors"), "not found"), (str(tmp_path), "model_index.json")]:
        src = write_embedding(tmp_path / "e.safetensors", _vector(), "<e>", "diffusers")
        code, _, err = run_cli(capsys, "--model", spec, "import", str(src))
        assert code == 2 and needle in err, (spec, err)


def test_family_from_checkpoint_keys():
    from engine.errors import NotSupportedError
    from engine.sd.models import family_from_keys

    assert family_from_keys(["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"]) == "sd1"
    assert family_from_keys(["cond_stage_model.model.token_embedding.weight"]) == "sd2"
    with pytest.raises(NotSupportedError, match="SDXL"):
        family_from_keys(["conditioner.embedders.1.model.token_embedding.weight"])


def test_builtin_specs_are_told_apart():
    from engine.sd.models import model_info

    assert model_info("builtin:sd15-arch").text_width == 768
    sd2 = model_info("builtin:sd21-arch")
    assert (sd2.family, sd2.text_width, sd2.prediction_type) == ("sd2", 1024, "v_prediction")


def test_hub_id_resolves_from_the_local_cache_offline(tmp_path, monkeypatch, tiny_model):
    """A hub id works with HF_HUB_OFFLINE=1 when the Hugging Face cache holds it."""
    from engine.sd.models import load_model, model_info

    hub = tmp_path / "hf" / "hub"
    repo = hub / "models--someone--tiny-sd"
    snapshot = repo / "snapshots" / ("a" * 40)
    tiny_model.pipe.save_pretrained(snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    info = model_info("someone/tiny-sd")
    assert info.kind == "hub" and info.text_width == 32
    import huggingface_hub

    asked = []
    real = huggingface_hub.snapshot_download
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: asked.append(k) or real(*a, **k))
    model_info("someone/tiny-sd")  # what the CLI and the studio do (online: configs only, tests/test_models.py)
    loaded = load_model("someone/tiny-sd")  # the worker
    assert asked and all(k.get("local_files_only") for k in asked)  # offline: the cache as it is, nothing fetched
    assert torch.equal(next(loaded.unet.parameters()), next(tiny_model.unet.parameters()))
    with pytest.raises(Exception, match="not in the local Hugging Face cache"):
        model_info("someone/absent")
