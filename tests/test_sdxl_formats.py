"""SDXL and multi-vector embeddings in and out: our exports load in diffusers with its documented calls
(rows equal ours bit for bit), imports check the family, and a file for another family writes nothing."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch

from engine.errors import UserError
from engine.inversion.importing import import_embedding
from engine.sd.formats import read_embedding, write_embedding, write_embedding_files
from engine.store.library import Library
from engine.store.paths import home_dir

TOKEN = "<my-cat>"


def _blocks(widths, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(n, w, generator=g) for w in widths)


@pytest.fixture(scope="module")
def diffusers_xl(tmp_path_factory, sdxl_model):
    """A small SDXL pipeline saved, then loaded by diffusers itself (not by our loader)."""
    folder = tmp_path_factory.mktemp("xl")
    sdxl_model.pipe.save_pretrained(folder)
    return folder


def _fresh_xl(folder):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(folder, add_watermarker=False)


def _rows(encoder, tokenizer, token, n):
    names = [token] + [f"{token}_{i}" for i in range(1, n)]
    ids = tokenizer.convert_tokens_to_ids(names)
    assert all(i != tokenizer.unk_token_id for i in ids), names
    return encoder.get_input_embeddings().weight[ids]


@pytest.mark.parametrize("fmt", ["a1111", "kohya", "comfy"])
def test_sdxl_export_loads_in_diffusers_with_the_two_call_form(diffusers_xl, tmp_path, fmt):
    blocks = _blocks((32, 64))
    path = write_embedding(tmp_path / f"{fmt}.safetensors", blocks, TOKEN, fmt)
    pipe = _fresh_xl(diffusers_xl)
    state = safetensors.torch.load_file(str(path))
    pipe.load_textual_inversion(state["clip_g"], token=TOKEN, text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    pipe.load_textual_inversion(state["clip_l"], token=TOKEN, text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    assert torch.equal(_rows(pipe.text_encoder, pipe.tokenizer, TOKEN, 2), blocks[0])
    assert torch.equal(_rows(pipe.text_encoder_2, pipe.tokenizer_2, TOKEN, 2), blocks[1])


def test_sdxl_diffusers_export_loads_in_diffusers_file_by_file(diffusers_xl, tmp_path):
    blocks = _blocks((32, 64), n=3, seed=1)
    first, second = write_embedding_files(tmp_path / "learned_embeds.safetensors", blocks, TOKEN, "diffusers")
    assert second.name == "learned_embeds_2.safetensors"
    pipe = _fresh_xl(diffusers_xl)
    pipe.load_textual_inversion(str(second), token=TOKEN, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    pipe.load_textual_inversion(str(first), token=TOKEN, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    assert torch.equal(_rows(pipe.text_encoder, pipe.tokenizer, TOKEN, 3), blocks[0])
    assert torch.equal(_rows(pipe.text_encoder_2, pipe.tokenizer_2, TOKEN, 3), blocks[1])


@pytest.mark.parametrize("fmt", ["diffusers", "a1111", "kohya", "comfy"])
def test_multi_vector_sd_export_registers_tok_tok_1_in_diffusers(tiny_model, tmp_path, fmt):
    from diffusers import StableDiffusionPipeline

    tiny_model.pipe.save_pretrained(tmp_path / "sd")
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "sd", safety_checker=None, requires_safety_checker=False)
    [vectors] = _blocks((32,), n=4, seed=2)
    path = write_embedding(tmp_path / f"e-{fmt}", vectors, TOKEN, fmt)
    pipe.load_textual_inversion(str(path), token=TOKEN)
    assert torch.equal(_rows(pipe.text_encoder, pipe.tokenizer, TOKEN, 4), vectors)


# --- import: the family decides ----------------------------------------------------------------------


@pytest.fixture
def xl_library(monkeypatch):
    monkeypatch.setenv("TISTUDIO_MODEL", "builtin:sdxl-tiny")
    return Library(home_dir())


def test_import_sdxl_file_into_an_sdxl_model(xl_library, tmp_path):
    blocks = _blocks((32, 64), n=2, seed=3)
    path = tmp_path / "ot.safetensors"
    safetensors.torch.save_file({"clip_l": blocks[0], "clip_g": blocks[1], "clip_l_out": blocks[0].clone(),
                                 "clip_g_out": blocks[1].clone()}, str(path))
    result = import_embedding(xl_library, path, name="cat")
    assert result.vectors == 2 and result.family == "sdxl"
    assert result.notes and "clip_l_out" in result.notes[0] and "clip_g_out" in result.notes[1]
    from engine.sd.generation import load_used

    used = load_used(xl_library.get("cat"))
    assert torch.equal(used.vectors, blocks[0]) and torch.equal(used.vectors_2, blocks[1])
    from engine.store.words import read_record, run_vectors

    record = read_record(xl_library.get("cat").runs_dir / result.run)
    assert run_vectors(record) == 2 and record["params"]["family"] == "sdxl"


def test_import_diffusers_pair_folder(xl_library, tmp_path):
    blocks = _blocks((32, 64), n=1, seed=4)
    write_embedding_files(tmp_path / "out" / "learned_embeds.safetensors", blocks, "<dog>", "diffusers")
    result = import_embedding(xl_library, tmp_path / "out")
    assert result.concept.token == "<dog>" and result.vectors == 1


@pytest.mark.parametrize(("blocks", "file_family"), [(_blocks((768,)), "SD 1.x"), (_blocks((1024,)), "SD 2.x"),
                                                      (_blocks((768, 1280)), "SDXL")])
def test_a_file_for_another_family_is_one_line_naming_both_and_nothing_is_written(xl_library, tmp_path, blocks,
                                                                                    file_family):
    path = write_embedding(tmp_path / "e.safetensors", blocks if len(blocks) > 1 else blocks[0], TOKEN, "kohya")
    with pytest.raises(UserError) as info:
        import_embedding(xl_library, path, name="cat")
    message = str(info.value)
    assert "\n" not in message and f"for {file_family} (" in message and "a model of SDXL (" in message
    assert xl_library.list() == []
    concepts = home_dir() / "concepts"
    assert not concepts.exists() or list(concepts.iterdir()) == []  # not even a hidden staging folder


def test_sdxl_file_into_an_sd_model_is_refused_naming_both(tmp_path, monkeypatch):
    monkeypatch.setenv("TISTUDIO_MODEL", "builtin:sd15-arch")
    path = write_embedding(tmp_path / "xl.safetensors", _blocks((768, 1280)), TOKEN, "kohya")
    with pytest.raises(UserError, match=r"for SDXL \(widths 768 \+ 1280\) does not fit builtin:sd15-arch, "
                                        r"a model of SD 1.x \(width 768\)"):
        import_embedding(Library(home_dir()), path)


def test_cli_export_and_import_on_sdxl(xl_library, tmp_path, capsys):
    from tistudio.cli import main

    blocks = _blocks((32, 64), n=2, seed=5)
    src = write_embedding(tmp_path / "src.safetensors", blocks, TOKEN, "kohya")
    assert main(["import", str(src), "--name", "cat"]) == 0, capsys.readouterr().err
    assert "2 vectors" in capsys.readouterr().out
    out = tmp_path / "exported" / "learned_embeds.safetensors"
    assert main(["export", "cat", "--format", "diffusers", "--out", str(out)]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "learned_embeds_2.safetensors" in printed
    back = read_embedding(out.parent)
    assert torch.equal(back.vectors, blocks[0]) and torch.equal(back.vectors_2, blocks[1])
