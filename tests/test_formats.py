"""engine.sd.formats: every producer layout in, three layouts out, hostile files refused."""

from __future__ import annotations

import base64
import json
import os
import pickle
import shlex

import pytest
import safetensors
import safetensors.torch
import torch

from engine.errors import NotSupportedError, UserError
from engine.sd import formats
from engine.sd.formats import (
    FORMATS_WRITE,
    Embedding,
    check_width,
    embedding_sha256,
    read_embedding,
    write_embedding,
)


def vecs(n: int = 2, dim: int = 768, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


def refused(exc_type, fn, *args, match: str | None = None, **kwargs) -> str:
    """Call fn, expect exc_type, and check the message is one line (the CLI prints it as-is)."""
    with pytest.raises(exc_type, match=match) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def a1111_dict(tensor: torch.Tensor, **extra) -> dict:
    return {
        "string_to_token": {"*": 265},
        "string_to_param": {"*": tensor},
        "name": "my-cat",
        "step": 1500,
        "sd_checkpoint": "4c86efd062",
        "sd_checkpoint_name": "v1-5-pruned",
        **extra,
    }


# --------------------------------------------------------------------------- read: every producer


def test_reads_diffusers_safetensors(tmp_path):
    v = vecs(3)
    path = tmp_path / "learned_embeds.safetensors"
    safetensors.torch.save_file({"<cat-toy>": v}, str(path), metadata={"format": "pt"})
    emb = read_embedding(path)
    assert emb.format == "diffusers" and emb.token == "<cat-toy>"
    assert torch.equal(emb.vectors, v)
    assert (emb.num_vectors, emb.width) == (3, 768)
    assert emb.meta["file_metadata"] == {"format": "pt"}
    assert emb.meta["path"] == str(path)


def test_reads_diffusers_bin(tmp_path):
    v = vecs(1, 1024)
    path = tmp_path / "learned_embeds.bin"
    torch.save({"<sks>": v}, path)
    emb = read_embedding(path)
    assert (emb.format, emb.token, emb.width) == ("diffusers", "<sks>", 1024)
    assert torch.equal(emb.vectors, v)


def test_reads_old_one_dimensional_diffusers_file(tmp_path):
    v = vecs(1)[0]
    path = tmp_path / "old.bin"
    torch.save({"<old>": v}, path)
    emb = read_embedding(path)
    assert emb.vectors.shape == (1, 768)
    assert torch.equal(emb.vectors[0], v)


def test_reads_a1111_pt(tmp_path):
    v = vecs(4)
    path = tmp_path / "my-cat.pt"
    torch.save(a1111_dict(v), path)
    emb = read_embedding(path)
    assert (emb.format, emb.token, emb.step) == ("a1111", "my-cat", 1500)
    assert emb.meta["sd_checkpoint_name"] == "v1-5-pruned"
    assert torch.equal(emb.vectors, v)


def test_reads_a1111_saved_mid_training_with_grad(tmp_path):
    # A1111 saves the live training tensor (requires_grad) or an nn.Parameter.
    v = vecs(2)
    torch.save(a1111_dict(v.clone().requires_grad_()), tmp_path / "grad.pt")
    torch.save(a1111_dict(torch.nn.Parameter(v.clone())), tmp_path / "param.pt")
    for name in ("grad.pt", "param.pt"):
        emb = read_embedding(tmp_path / name)
        assert torch.equal(emb.vectors, v) and not emb.vectors.requires_grad
        assert type(emb.vectors) is torch.Tensor


def test_reads_original_textual_inversion_repo(tmp_path):
    # The original repo pickled an nn.ParameterDict and tensor token ids, with no name.
    v = vecs(2)
    params = torch.nn.ParameterDict({"*": torch.nn.Parameter(v.clone())})
    path = tmp_path / "embeddings_gs-6099.pt"
    torch.save({"string_to_token": {"*": torch.tensor(265)}, "string_to_param": params}, path)
    emb = read_embedding(path)
    assert (emb.format, emb.token, emb.step) == ("textual_inversion", None, None)
    assert torch.equal(emb.vectors, v)


def test_reads_original_textual_inversion_plain_dict(tmp_path):
    v = vecs(1)
    path = tmp_path / "embeddings.pt"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": v}}, path)
    emb = read_embedding(path)
    assert emb.format == "textual_inversion"
    assert torch.equal(emb.vectors, v)


@pytest.mark.parametrize(("key", "fmt"), [("emb_params", "kohya"), ("emp_params", "onetrainer")])
def test_reads_kohya_and_onetrainer(tmp_path, key, fmt):
    v = vecs(5)
    path = tmp_path / f"{fmt}.safetensors"
    safetensors.torch.save_file({key: v}, str(path))
    emb = read_embedding(path)
    assert (emb.format, emb.token) == (fmt, None)
    assert torch.equal(emb.vectors, v)


def test_reads_a1111_png_text_chunk(tmp_path):
    from PIL import Image, PngImagePlugin

    v = vecs(2)
    data = a1111_dict(v)
    data["string_to_param"] = {"*": {"TORCHTENSOR": v.numpy().tolist()}}  # A1111's JSON encoding
    info = PngImagePlugin.PngInfo()
    info.add_text("sd-ti-embedding", base64.b64encode(json.dumps(data).encode()).decode())
    path = tmp_path / "my-cat.png"
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    emb = read_embedding(path)
    assert (emb.format, emb.token, emb.step) == ("a1111", "my-cat", 1500)
    assert torch.equal(emb.vectors, v)


def test_png_without_embedding_chunk_refused(tmp_path):
    from PIL import Image

    path = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(path)
    refused(UserError, read_embedding, path, match="sd-ti-embedding")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_dtypes_become_float32(tmp_path, dtype):
    v = vecs(2).to(dtype)
    path = tmp_path / "e.bin"
    torch.save({"<t>": v}, path)
    emb = read_embedding(path)
    assert emb.vectors.dtype == torch.float32 and emb.vectors.is_contiguous()
    assert torch.equal(emb.vectors, v.float())


def test_leading_singleton_dims_are_squeezed(tmp_path):
    v = vecs(2)
    path = tmp_path / "e.safetensors"
    safetensors.torch.save_file({"emb_params": v[None]}, str(path))
    assert read_embedding(path).vectors.shape == (2, 768)


# --------------------------------------------------------------------------- write: round trips


@pytest.mark.parametrize(
    ("fmt", "name"),
    [("diffusers", "e.safetensors"), ("diffusers", "e.bin"), ("a1111", "e.pt"), ("kohya", "e.safetensors")],
)
def test_round_trip_is_bit_for_bit(tmp_path, fmt, name):
    v = vecs(3)
    v[0, 0] = -0.0  # sign of zero and subnormals must survive too
    v[0, 1] = torch.finfo(torch.float32).tiny / 4
    out = write_embedding(tmp_path / name, v, "<cat>", fmt, step=42, model_name="sd15")
    assert out == tmp_path / name
    emb = read_embedding(out)
    assert torch.equal(emb.vectors.view(torch.int32), v.view(torch.int32))
    assert emb.format == fmt
    assert embedding_sha256(emb.vectors) == embedding_sha256(v)
    if fmt != "kohya":  # kohya files carry no token; the file name is the token
        assert emb.token == "<cat>"
    if fmt == "a1111":
        assert emb.step == 42 and emb.meta["sd_checkpoint_name"] == "sd15"


def test_diffusers_export_layout(tmp_path):
    out = write_embedding(tmp_path / "e.safetensors", vecs(2), "<cat>")
    with safetensors.safe_open(str(out), framework="pt") as fh:
        assert list(fh.keys()) == ["<cat>"]
        assert fh.metadata() == {"format": "pt"}


def test_a1111_export_layout_loads_weights_only(tmp_path):
    v = vecs(2)
    out = write_embedding(tmp_path / "e.pt", v, "my-cat", "a1111", step=7, model_name="sd15")
    data = torch.load(out, map_location="cpu", weights_only=True)
    assert data.keys() == {"string_to_token", "string_to_param", "name", "step", "sd_checkpoint", "sd_checkpoint_name"}
    assert data["string_to_token"] == {"*": 265}
    assert type(data["string_to_param"]["*"]) is torch.Tensor
    assert (data["name"], data["step"]) == ("my-cat", 7)
    assert (data["sd_checkpoint"], data["sd_checkpoint_name"]) == (None, "sd15")


def test_kohya_export_layout(tmp_path):
    out = write_embedding(tmp_path / "e.safetensors", vecs(2), "<cat>", "kohya")
    assert safetensors.torch.load_file(str(out)).keys() == {"emb_params"}


def test_write_copies_input_and_accepts_grad_and_views(tmp_path):
    base = vecs(4, 768).requires_grad_()
    view = base[::2]  # non-contiguous, shares storage, needs grad
    out = write_embedding(tmp_path / "e.safetensors", view, "<t>")
    emb = read_embedding(out)
    assert torch.equal(emb.vectors, view.detach())
    assert emb.vectors.is_contiguous() and emb.vectors.dtype == torch.float32


def test_write_appends_default_suffix_and_refuses_wrong_one(tmp_path):
    assert write_embedding(tmp_path / "cat", vecs(), "<t>") == tmp_path / "cat.safetensors"
    assert write_embedding(tmp_path / "cat.v2", vecs(), "<t>", "a1111") == tmp_path / "cat.v2.pt"
    refused(UserError, write_embedding, tmp_path / "cat.safetensors", vecs(), "<t>", "a1111", match=r"\.pt")
    refused(UserError, write_embedding, tmp_path / "cat.bin", vecs(), "<t>", "kohya", match=r"\.safetensors")


def test_write_refuses_unknown_format_and_bad_vectors(tmp_path):
    refused(UserError, write_embedding, tmp_path / "e.safetensors", vecs(), "<t>", "ckpt", match="diffusers")
    bad = vecs()
    bad[1, 3] = float("nan")
    refused(UserError, write_embedding, tmp_path / "e.safetensors", bad, "<t>", match="NaN")
    refused(UserError, write_embedding, tmp_path / "e.safetensors", vecs(), "  ", match="token")
    assert list(tmp_path.iterdir()) == []


def test_write_overwrites_atomically(tmp_path):
    path = tmp_path / "e.safetensors"
    write_embedding(path, vecs(seed=1), "<t>")
    write_embedding(path, vecs(seed=2), "<t>")
    assert torch.equal(read_embedding(path).vectors, vecs(seed=2))
    assert [p.name for p in tmp_path.iterdir()] == ["e.safetensors"]


@pytest.mark.parametrize(("fmt", "name", "target"), [
    ("diffusers", "e.safetensors", "safetensors.torch.save_file"),
    ("kohya", "e.safetensors", "safetensors.torch.save_file"),
    ("a1111", "e.pt", "torch.save"),
])
def test_failed_write_leaves_nothing(tmp_path, monkeypatch, fmt, name, target):
    def half_write(_obj, dest, *args, **kwargs):
        with open(dest, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(target, half_write)
    with pytest.raises(OSError, match="disk full"):
        write_embedding(tmp_path / name, vecs(), "<t>", fmt)
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "e.safetensors"
    write_embedding(path, vecs(seed=1), "<t>")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", boom)
    with pytest.raises(OSError):
        write_embedding(path, vecs(seed=2), "<t>")
    assert torch.equal(read_embedding(path).vectors, vecs(seed=1))
    assert [p.name for p in tmp_path.iterdir()] == ["e.safetensors"]


# --------------------------------------------------------------------------- refusals


class _Payload:
    """Unpickling this runs `touch marker`: what a hostile .pt can do to a naive loader."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


def test_payload_really_runs_when_unpickled_naively(tmp_path):
    # Guard against a vacuous malicious-pickle test: the payload does work.
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Payload(control)))
    assert control.exists()


@pytest.mark.parametrize("container", ["raw-pickle", "torch-save"])
def test_malicious_pickle_refused_without_running(tmp_path, container):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    if container == "raw-pickle":
        path.write_bytes(pickle.dumps(_Payload(marker), protocol=2))
    else:
        torch.save({"<t>": _Payload(marker)}, path)
    message = refused(UserError, read_embedding, path, match="refused to load")
    assert "system" in message  # names the offending global
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("protocol", [4, 5])
def test_malicious_pickle_newer_protocol_refused_without_running(tmp_path, protocol):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(_Payload(marker), protocol=protocol))
    refused(UserError, read_embedding, path, match="safe loading refuses")
    assert not marker.exists()


def test_sdxl_clip_l_clip_g_file_reads_as_two_blocks(tmp_path):
    """kohya, A1111, ComfyUI: one safetensors with clip_l [n, 768] and clip_g [n, 1280]."""
    path = tmp_path / "sdxl.safetensors"
    lv, g = vecs(2, 768, seed=1), vecs(2, 1280, seed=2)
    safetensors.torch.save_file({"clip_l": lv, "clip_g": g}, str(path))
    emb = read_embedding(path)
    assert (emb.format, emb.widths, emb.num_vectors, emb.family) == ("sdxl", (768, 1280), 2, "sdxl")
    assert torch.equal(emb.blocks[0], lv) and torch.equal(emb.blocks[1], g)


def test_onetrainer_sdxl_output_embeddings_are_ignored_and_said(tmp_path):
    path = tmp_path / "ot.safetensors"
    safetensors.torch.save_file({"clip_l": vecs(1, 768), "clip_g": vecs(1, 1280), "clip_l_out": vecs(1, 768),
                                 "clip_g_out": vecs(1, 1280)}, str(path))
    emb = read_embedding(path)
    assert emb.format == "onetrainer" and emb.widths == (768, 1280)
    assert emb.meta["ignored"] == ["clip_l_out", "clip_g_out"]


def test_onetrainer_sd_emp_params_out_is_ignored_and_said(tmp_path):
    path = tmp_path / "ot.safetensors"
    safetensors.torch.save_file({"emp_params": vecs(3), "emp_params_out": vecs(3)}, str(path))
    emb = read_embedding(path)
    assert (emb.format, emb.widths, emb.meta["ignored"]) == ("onetrainer", (768,), ["emp_params_out"])


def test_sdxl_blocks_of_different_lengths_refused(tmp_path):
    path = tmp_path / "bad.safetensors"
    safetensors.torch.save_file({"clip_l": vecs(2, 768), "clip_g": vecs(3, 1280)}, str(path))
    refused(UserError, read_embedding, path, match="clip_l has 2 vectors but clip_g 3")


def test_half_an_sdxl_file_refused(tmp_path):
    path = tmp_path / "half.safetensors"
    safetensors.torch.save_file({"clip_g": vecs(2, 1280)}, str(path))
    refused(UserError, read_embedding, path, match="needs both clip_l and clip_g")


def test_diffusers_sdxl_pair_reads_from_either_file_or_its_folder(tmp_path):
    """diffusers' textual_inversion_sdxl.py: learned_embeds (768) + learned_embeds_2 (1280), {token: [n, d]}."""
    lv, g = vecs(3, 768, seed=3), vecs(3, 1280, seed=4)
    safetensors.torch.save_file({"<cat>": lv}, str(tmp_path / "learned_embeds.safetensors"))
    safetensors.torch.save_file({"<cat>": g}, str(tmp_path / "learned_embeds_2.safetensors"))
    for source in (tmp_path, tmp_path / "learned_embeds.safetensors", tmp_path / "learned_embeds_2.safetensors"):
        emb = read_embedding(source)
        assert (emb.format, emb.token, emb.widths, emb.family) == ("diffusers", "<cat>", (768, 1280), "sdxl")
        assert torch.equal(emb.vectors, lv) and torch.equal(emb.vectors_2, g)


def test_diffusers_pair_of_different_words_refused(tmp_path):
    safetensors.torch.save_file({"<cat>": vecs(1, 768)}, str(tmp_path / "learned_embeds.safetensors"))
    safetensors.torch.save_file({"<dog>": vecs(1, 1280)}, str(tmp_path / "learned_embeds_2.safetensors"))
    refused(UserError, read_embedding, tmp_path, match="same word")
    # given one file, a neighbour that is not its other half is left alone
    emb = read_embedding(tmp_path / "learned_embeds.safetensors")
    assert (emb.token, emb.widths) == ("<cat>", (768,))
    (tmp_path / "other").mkdir()
    refused(UserError, read_embedding, tmp_path / "other", match="nor a folder holding diffusers' SDXL pair")


def test_kohya_xti_is_read_as_a_per_layer_word_in_kohyas_order(tmp_path):
    """kohya's loader concatenates the 16 layers in key order (IN01 … MID … OUT11): so do we."""
    path = tmp_path / "xti.safetensors"
    keys = ["IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID", "OUT03", "OUT04", "OUT05", "OUT06", "OUT07",
            "OUT08", "OUT09", "OUT10", "OUT11"]
    data = {k: vecs(2, 768, seed=i) for i, k in enumerate(keys)}
    safetensors.torch.save_file(data, str(path))
    emb = read_embedding(path)
    assert (emb.format, emb.layers, emb.num_vectors, emb.family) == ("kohya-xti", tuple(keys), 2, "sd1")
    assert torch.equal(emb.vectors, torch.cat([data[k] for k in keys]))
    data["MID"] = vecs(3, 768)
    safetensors.torch.save_file(data, str(path))
    refused(UserError, read_embedding, path, match="layers differ in shape")


@pytest.mark.parametrize("fmt", ["a1111", "kohya", "comfy"])
def test_sdxl_writes_clip_l_clip_g_for_a1111_kohya_comfy(tmp_path, fmt):
    lv, g = vecs(2, 768, seed=5), vecs(2, 1280, seed=6)
    out = write_embedding(tmp_path / f"{fmt}-xl", (lv, g), "<cat>", fmt)
    assert out == tmp_path / f"{fmt}-xl.safetensors"
    raw = safetensors.torch.load_file(str(out))
    assert set(raw) == {"clip_l", "clip_g"}
    assert torch.equal(raw["clip_l"], lv) and torch.equal(raw["clip_g"], g)
    refused(UserError, write_embedding, tmp_path / "x.pt", (lv, g), "<cat>", fmt, match="SDXL")


def test_sdxl_writes_diffusers_pair(tmp_path):
    lv, g = vecs(2, 768, seed=7), vecs(2, 1280, seed=8)
    paths = formats.write_embedding_files(tmp_path / "learned_embeds.safetensors", (lv, g), "<cat>", "diffusers")
    assert paths == [tmp_path / "learned_embeds.safetensors", tmp_path / "learned_embeds_2.safetensors"]
    assert torch.equal(safetensors.torch.load_file(str(paths[0]))["<cat>"], lv)
    assert torch.equal(safetensors.torch.load_file(str(paths[1]))["<cat>"], g)
    back = read_embedding(paths[0])
    assert torch.equal(back.vectors, lv) and torch.equal(back.vectors_2, g)


def test_comfy_writes_a_file_comfy_reads_for_sd(tmp_path):
    out = write_embedding(tmp_path / "c", vecs(2), "<cat>", "comfy")
    assert set(safetensors.torch.load_file(str(out))) == {"emb_params"}
    assert read_embedding(out).widths == (768,)


def test_other_multi_encoder_embedding_not_supported(tmp_path):
    path = tmp_path / "flux.safetensors"
    safetensors.torch.save_file({"clip_l": vecs(2, 768), "t5": vecs(2, 4096)}, str(path))
    refused(NotSupportedError, read_embedding, path, match="multi-text-encoder")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_values_refused(tmp_path, bad):
    v = vecs()
    v[1, 5] = bad
    path = tmp_path / "e.safetensors"
    safetensors.torch.save_file({"<t>": v}, str(path))
    message = refused(UserError, read_embedding, path, match="NaN or infinite")
    assert str(path) in message


def test_fp64_overflowing_float32_refused(tmp_path):
    v = vecs().double()
    v[0, 0] = 1e300
    path = tmp_path / "e.bin"
    torch.save({"<t>": v}, path)
    refused(UserError, read_embedding, path, match="infinite")


@pytest.mark.parametrize("tensor", [torch.ones(2, 768, dtype=torch.int64), torch.ones(2, 768, dtype=torch.bool)])
def test_non_float_tensor_refused(tmp_path, tensor):
    path = tmp_path / "e.safetensors"
    safetensors.torch.save_file({"<t>": tensor}, str(path))
    refused(UserError, read_embedding, path, match="not floating point")


@pytest.mark.parametrize(
    ("shape", "why"),
    [((76, 768), "at most 75"), ((1, 4097), "at most 75"), ((0, 768), "empty"), ((2, 3, 768), "not \\[vectors")],
)
def test_bad_shapes_refused(tmp_path, shape, why):
    path = tmp_path / "e.safetensors"
    safetensors.torch.save_file({"emb_params": torch.zeros(shape)}, str(path))
    refused(UserError, read_embedding, path, match=why)


def test_scalar_refused(tmp_path):
    path = tmp_path / "e.bin"
    torch.save({"<t>": torch.tensor(1.0)}, path)
    refused(UserError, read_embedding, path, match="scalar")


def test_garbage_safetensors_refused(tmp_path):
    path = tmp_path / "e.safetensors"
    path.write_bytes(os.urandom(256))
    message = refused(UserError, read_embedding, path, match="not a valid safetensors")
    assert str(path) in message


def test_pickle_with_safetensors_extension_gets_hint(tmp_path):
    path = tmp_path / "e.safetensors"
    torch.save({"<t>": vecs()}, path)
    refused(UserError, read_embedding, path, match="look like a pickle")


def test_safetensors_with_pt_extension_gets_hint(tmp_path):
    path = tmp_path / "e.pt"
    safetensors.torch.save_file({"<t>": vecs()}, str(path))
    refused(UserError, read_embedding, path, match="look like a safetensors")


def test_garbage_pickle_refused(tmp_path):
    path = tmp_path / "e.pt"
    path.write_bytes(b"not a pickle at all")
    refused(UserError, read_embedding, path, match="not a valid PyTorch file")


def test_empty_file_refused(tmp_path):
    for name in ("e.pt", "e.safetensors"):
        (tmp_path / name).write_bytes(b"")
        refused(UserError, read_embedding, tmp_path / name, match="not a valid")


def test_missing_file_and_directory_refused(tmp_path):
    refused(UserError, read_embedding, tmp_path / "nope.safetensors", match="no such file")
    refused(UserError, read_embedding, tmp_path, match="not a file")


def test_huge_file_refused_before_loading(tmp_path):
    path = tmp_path / "model.safetensors"
    with open(path, "wb") as fh:
        fh.truncate(formats.MAX_FILE_BYTES + 1)  # sparse: costs no disk
    refused(UserError, read_embedding, path, match="too large")


def test_unknown_extension_is_sniffed(tmp_path):
    path = tmp_path / "embedding.dat"
    safetensors.torch.save_file({"<t>": vecs()}, str(path))
    assert read_embedding(path).token == "<t>"
    (tmp_path / "x.txt").write_text("hello")
    refused(UserError, read_embedding, tmp_path / "x.txt", match="unknown file type")


def test_unknown_layout_lists_keys_and_formats(tmp_path):
    path = tmp_path / "e.pt"
    torch.save({"weights": "nope", "version": 3}, path)
    message = refused(UserError, read_embedding, path, match="unknown embedding layout")
    assert "'weights'" in message and "'version'" in message and "kohya" in message


def test_unknown_layout_key_list_is_truncated(tmp_path):
    path = tmp_path / "e.pt"
    torch.save({f"key{i}": i for i in range(30)}, path)
    message = refused(UserError, read_embedding, path)
    assert "+22 more" in message and "key29" not in message


def test_several_tensor_keys_refused_naming_them(tmp_path):
    path = tmp_path / "e.safetensors"
    safetensors.torch.save_file({"<a>": vecs(), "<b>": vecs()}, str(path))
    message = refused(UserError, read_embedding, path, match="2 tensors")
    assert "'<a>'" in message and "'<b>'" in message


def test_extra_keys_beside_emb_params_refused(tmp_path):
    path = tmp_path / "e.safetensors"
    safetensors.torch.save_file({"emb_params": vecs(), "lora_up": vecs()}, str(path))
    refused(UserError, read_embedding, path, match="'lora_up'")


def test_a1111_extra_metadata_keys_are_fine(tmp_path):
    path = tmp_path / "e.pt"
    torch.save(a1111_dict(vecs(), hash="abc", vectors=2), path)
    emb = read_embedding(path)
    assert emb.format == "a1111" and emb.meta["hash"] == "abc"


def test_a1111_with_several_params_refused(tmp_path):
    path = tmp_path / "e.pt"
    data = a1111_dict(vecs())
    data["string_to_param"] = {"*": vecs(), "@": vecs()}
    torch.save(data, path)
    refused(UserError, read_embedding, path, match="exactly one")


def test_non_dict_file_refused(tmp_path):
    path = tmp_path / "e.pt"
    torch.save(vecs(), path)
    refused(UserError, read_embedding, path, match="not a dict")


# --------------------------------------------------------------------------- width, hash


def test_check_width_names_both_widths():
    emb = Embedding(vectors=vecs(2, 768), token="<t>", format="diffusers")
    check_width(emb, 768)  # matching width is fine
    message = refused(UserError, check_width, emb, 1024, "sd2-base")
    assert "768" in message and "1024" in message and "sd2-base" in message


@pytest.mark.parametrize(("widths", "model_widths", "file_family", "model_family"), [
    ((768,), (768, 1280), "SD 1.x", "SDXL"),
    ((1024,), (768,), "SD 2.x", "SD 1.x"),
    ((768, 1280), (1024,), "SDXL", "SD 2.x"),
    ((768, 1280), (768,), "SDXL", "SD 1.x"),
])
def test_width_decides_the_family_and_a_mismatch_names_both(widths, model_widths, file_family, model_family):
    blocks = [vecs(1, w) for w in widths]
    emb = Embedding(vectors=blocks[0], token="<t>", format="x", vectors_2=blocks[1] if len(blocks) > 1 else None)
    message = refused(UserError, check_width, emb, model_widths, "my-model")
    assert f"for {file_family} (" in message and f"a model of {model_family} (" in message and "my-model" in message


def test_embedding_sha256_is_stable_and_dtype_independent():
    v = vecs()
    assert embedding_sha256(v) == embedding_sha256(v.clone())
    assert embedding_sha256(v.double()) == embedding_sha256(v)  # hashed as fp32
    assert embedding_sha256(v[:, :].t().contiguous().t()) == embedding_sha256(v)  # layout-independent
    w = v.clone()
    w[0, 0] += 1
    assert embedding_sha256(w) != embedding_sha256(v)
    assert len(embedding_sha256(v)) == 64


def test_formats_write_constant():
    assert FORMATS_WRITE == ("diffusers", "a1111", "kohya", "comfy", "kohya-xti")
