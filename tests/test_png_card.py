"""A1111's PNG embedding card: our cards decode, both halves, by A1111's own steps to our vectors
bit for bit; our importer reads them (the chunk, else the pixels); `tistudio export --format
a1111-png` pictures the word and refuses a path that is not a .png."""

from __future__ import annotations

import base64
import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.errors import UserError
from engine.sd.formats import read_embedding, write_embedding
from engine.sd.png_card import CARD_SIZE, key_stream, write_card
from engine.store.library import Library
from engine.store.paths import atomic_write_json, home_dir
from engine.store.words import step_file
from tistudio.cli import main

# --- A1111's decoder, for reference -------------------------------------------------------------
# Written for this test from the description of A1111's modules/textual_inversion/image_embedding.py
# (embedding_from_b64, lcg, xor_block, crop_black, extract_image_data_embed) and its loader
# (textual_inversion.py: the text chunk first, else the pixels; tensors read as float64, then
# cast to float32).  Not A1111's code, and on purpose as plain as the description: one LCG step
# per byte, loops where A1111 loops, nothing shared with engine.sd.png_card.


def a1111_lcg():
    seed = 0
    while True:
        seed = (1664525 * seed + 1013904223) % 2**32
        yield seed % 255


def a1111_xor_block(block: np.ndarray) -> np.ndarray:
    stream = a1111_lcg()
    key = np.array([next(stream) for _ in range(block.size)]).astype(np.uint8).reshape(block.shape)
    return np.bitwise_xor(block.astype(np.uint8), key & 0x0F)


def a1111_crop_black(pixels: np.ndarray) -> np.ndarray:
    lit = (pixels > 0).all(axis=2)
    rows = [y for y in range(lit.shape[0]) if lit[y].any()]
    cols = [x for x in range(lit.shape[1]) if lit[:, x].any()]
    return pixels[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def a1111_tensors(obj: dict):
    if "TORCHTENSOR" in obj:
        return np.array(obj["TORCHTENSOR"])  # float64, as torch.from_numpy(np.array(...)) gives
    return obj


def a1111_pixels(path: Path) -> dict:
    with Image.open(path) as image:
        pixels = np.array(image.convert("RGB")).astype(np.uint8)
    low_nibbles = a1111_crop_black(pixels) & 0x0F
    black = np.where(np.sum(low_nibbles, axis=(0, 2)) == 0)[0]
    assert len(black) >= 2, "A1111 finds no data blocks"
    lower = a1111_xor_block(low_nibbles[:, :black.min(), :])
    upper = a1111_xor_block(low_nibbles[:, black.max() + 1:, :])
    data = ((upper << 4) | lower).flatten().tobytes()
    return json.loads(zlib.decompress(data), object_hook=a1111_tensors)


def a1111_chunk(path: Path) -> dict:
    with Image.open(path) as image:
        text = image.text["sd-ti-embedding"]
    return json.loads(base64.b64decode(text), object_hook=a1111_tensors)


def a1111_vectors(data: dict) -> list[np.ndarray]:
    """What A1111's create_embedding_from_data keeps: string_to_param's tensor, or SDXL's pair."""
    if "string_to_param" in data:
        (vec,) = data["string_to_param"].values()
        return [vec.astype(np.float32)]
    assert set(data) == {"clip_l", "clip_g"}  # it casts every value of an SDXL dict to a tensor
    return [data["clip_l"].astype(np.float32), data["clip_g"].astype(np.float32)]


# -------------------------------------------------------------------------------------------------


def same_bits(a: np.ndarray, b) -> bool:
    b = np.asarray(b, dtype=np.float32)
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def blocks_of(widths, n=2, seed=0):
    rng = np.random.default_rng(seed)
    # awkward values too: a subnormal, the largest float32, -0.0
    blocks = [rng.standard_normal((n, w)).astype(np.float32) for w in widths]
    blocks[0][0, :3] = [np.float32(1e-45), np.finfo(np.float32).max, -0.0]
    return blocks


def picture(seed=1):
    """A picture with the worst corners for a reader: black rows and columns at its edges."""
    pixels = np.random.default_rng(seed).integers(0, 256, (CARD_SIZE, CARD_SIZE, 3), dtype=np.uint8)
    pixels[:40], pixels[:, -30:] = 0, 0
    return Image.fromarray(pixels)


def test_the_key_stream_is_a1111s():
    """A1111's own self-test numbers: its first values and the sum of the next 100000."""
    stream = key_stream(100_100)
    assert stream[:10].tolist() == [253, 242, 127, 44, 157, 27, 239, 133, 38, 79]
    assert int(stream[100:].astype(np.int64).sum()) == 12731374
    reference = a1111_lcg()
    assert stream[:5000].tolist() == [next(reference) for _ in range(5000)]


@pytest.mark.parametrize("widths", [(768,), (1024,), (768, 1280)], ids=["sd1", "sd2", "sdxl"])
def test_both_halves_decode_by_a1111s_steps_to_our_vectors_bit_for_bit(tmp_path, widths):
    blocks = blocks_of(widths)
    path = write_card(tmp_path / "card.png", blocks, "<cat-toy>", picture(), step=1500, model_name="v1-5")
    from_chunk, from_pixels = a1111_chunk(path), a1111_pixels(path)
    for decoded in (from_chunk, from_pixels):
        vectors = a1111_vectors(decoded)
        assert len(vectors) == len(blocks) and all(same_bits(v, b) for v, b in zip(vectors, blocks))
    if len(widths) == 1:  # A1111's .pt dict: its loader takes the word's name and step from it
        assert (from_pixels["name"], from_pixels["step"], from_pixels["sd_checkpoint_name"]) == ("<cat-toy>", 1500,
                                                                                                "v1-5")
    with Image.open(path) as card:
        pixels = np.asarray(card.convert("RGB"))
    # [low block][black column][the 512-px picture][black column][high block], as tall as the picture
    side = (pixels.shape[1] - CARD_SIZE - 2) // 2
    assert pixels.shape[0] == CARD_SIZE and pixels.shape[1] == CARD_SIZE + 2 + 2 * side and side >= 1
    assert not pixels[:, side].any() and not pixels[:, side + 1 + CARD_SIZE].any()


def test_our_importer_reads_the_chunk_and_else_the_pixels(tmp_path):
    blocks = blocks_of((768, 1280), n=3, seed=4)
    card = write_card(tmp_path / "word.png", blocks, "<w>", picture(2))
    emb = read_embedding(card)
    assert emb.format == "sdxl" and same_bits(emb.vectors.numpy(), blocks[0]) and same_bits(
        emb.vectors_2.numpy(), blocks[1])
    # a site that strips text chunks: the same pixels, no chunk
    stripped = tmp_path / "stripped.png"
    with Image.open(card) as image:
        assert "sd-ti-embedding" in image.text
        image.convert("RGB").save(stripped)
    with Image.open(stripped) as image:
        assert "sd-ti-embedding" not in image.text
    emb = read_embedding(stripped)
    assert same_bits(emb.vectors.numpy(), blocks[0]) and same_bits(emb.vectors_2.numpy(), blocks[1])

    sd1 = blocks_of((768,), seed=5)
    stripped_sd1 = tmp_path / "sd1.png"
    with Image.open(write_card(tmp_path / "sd1-card.png", sd1, "<v>", picture(3), step=7)) as image:
        image.convert("RGB").save(stripped_sd1)
    emb = read_embedding(stripped_sd1)
    assert (emb.format, emb.token, emb.step) == ("a1111", "<v>", 7) and same_bits(emb.vectors.numpy(), sd1[0])


def test_a_picture_without_a_hidden_copy_is_still_refused(tmp_path):
    path = tmp_path / "photo.png"
    picture(4).save(path)
    with pytest.raises(UserError, match="neither a 'sd-ti-embedding' text chunk nor A1111's copy"):
        read_embedding(path)


# --- tistudio export --format a1111-png ----------------------------------------------------------


def solid(path: Path, colour) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 64), colour).save(path)
    return path


@pytest.fixture
def word(tmp_path):
    """A concept whose one training image is blue, and a finished run of it (vectors of the
    tiny model's width, 32) with previews at steps 5 (red) and 10 (green)."""
    library = Library(home_dir())
    concept = library.add("toy", solid(tmp_path / "images" / "a.png", (0, 0, 220)).parent, "cat")
    run_dir = concept.runs_dir / "run1"
    vectors = torch.randn(2, 32, generator=torch.Generator().manual_seed(0))
    write_embedding(run_dir / "learned_embeds.safetensors", vectors, concept.token)
    write_embedding(step_file(run_dir, 5), vectors + 5, concept.token)
    atomic_write_json(run_dir / "run.json", {"id": "run1", "status": "done", "created": 1.0, "steps": 10,
                                             "model": {"spec": "builtin:tiny", "family": "sd1"}})
    solid(run_dir / "previews" / "step-5.png", (220, 0, 0))
    solid(run_dir / "previews" / "step-10.png", (0, 220, 0))
    return concept, run_dir, vectors


def card_colour(path: Path) -> int:
    """Which channel dominates the card's picture (its middle rows, under the caption's light shade)."""
    with Image.open(path) as card:
        pixels = np.asarray(card.convert("RGB")).astype(np.int64)
    side = (pixels.shape[1] - CARD_SIZE - 2) // 2
    middle = pixels[200:300, side + 1 + 100:side + 1 + CARD_SIZE - 100]
    return int(np.argmax(middle.mean(axis=(0, 1))))


def test_export_writes_a_card_of_the_runs_preview_and_import_reads_it_back(word, tmp_path, capsys):
    concept, run_dir, vectors = word
    out = tmp_path / "card.png"
    assert main(["export", "toy", "--format", "a1111-png", "--out", str(out)]) == 0, capsys.readouterr().err
    assert card_colour(out) == 1  # the latest preview: green
    (vec,) = a1111_vectors(a1111_pixels(out))
    assert same_bits(vec, vectors.numpy())
    assert main(["export", "toy", "--format", "a1111-png", "--step", "5", "--out", str(tmp_path / "s5.png")]) == 0
    assert card_colour(tmp_path / "s5.png") == 0  # the preview at its step: red
    assert same_bits(a1111_vectors(a1111_chunk(tmp_path / "s5.png"))[0], (vectors + 5).numpy())

    assert main(["import", str(out), "--name", "again", "--token", "<again>"]) == 0, capsys.readouterr().err
    from engine.sd.generation import load_used

    assert torch.equal(load_used(Library(home_dir()).get("again")).vectors, vectors)


def test_without_previews_the_card_shows_the_first_training_image(word, tmp_path, capsys):
    _, run_dir, _ = word
    for preview in (run_dir / "previews").iterdir():
        preview.unlink()
    out = tmp_path / "card.png"
    assert main(["export", "toy", "--format", "a1111-png", "--out", str(out)]) == 0, capsys.readouterr().err
    assert card_colour(out) == 2  # the training image: blue


@pytest.mark.parametrize("name", ["card.safetensors", "card.pt", "card"])
def test_a_card_must_be_a_png_path(word, tmp_path, capsys, name):
    out = tmp_path / name
    assert main(["export", "toy", "--format", "a1111-png", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "ending in .png" in err and "--out" in err
    assert list(tmp_path.glob("card*")) == []


async def test_the_studios_export_dialog_offers_the_card_and_names_a_png():
    from textual.app import App
    from textual.widgets import Input, Select

    from tistudio.screens.modals import ExportModal, ExportRequest

    answers = []
    app = App()
    async with app.run_test() as pilot:
        app.push_screen(ExportModal("toy", [("run1 (10 steps)", "run1")], "/x/toy.safetensors"), answers.append)
        await pilot.pause()
        app.screen.query_one("#format", Select).value = "a1111-png"
        await pilot.pause()
        assert app.screen.query_one("#out", Input).value == "/x/toy.png"
        await pilot.click("#ok")
        await pilot.pause()
    assert answers == [ExportRequest(Path("/x/toy.png"), "a1111-png", "run1")]
