"""Per-layer words (P+ / XTI): which layers a UNet has, how each reads its own vectors, training,
generation, Table 1, kohya's XTI files both ways, and the refusals."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from engine.errors import JobCancelled, UserError
from engine.inversion.train import QuietReporter, RunSlot, TrainConfig, train
from engine.sd.formats import read_embedding, write_embedding
from engine.sd.layers import SD_LAYERS, cross_attention_layers
from engine.store.library import Library
from engine.store.paths import home_dir
from tistudio.cli import main

TINY_LAYERS = ("IN03", "MID", "OUT00", "OUT01")  # builtin:tiny: one cross-attention down block, the mid, one up
CONFIGS = Path(__file__).resolve().parents[1] / "engine" / "sd" / "configs"


def _cfg(**kw):
    base = dict(token="<thing>", init="cat", steps=8, lr=5e-2, save_every=4, preview_every=0, log_every=2,
                per_layer=True, probe_every=0, dloss_every=0)
    base.update(kw)
    return TrainConfig(**base)


def _images(image_dir):
    return sorted(image_dir.glob("*.png"))


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


# --- which layers ------------------------------------------------------------------------------------------


def test_sd15_has_kohyas_16_layers_where_its_ldm_blocks_are():
    """The keys are the LDM block indices of each attention: checked against tests/ldm_layout.py's own
    diffusers -> LDM key conversion of the same UNet config, and against kohya's table (SD 1.5)."""
    from ldm_layout import unet_to_ldm

    config = json.loads((CONFIGS / "sd15" / "unet" / "config.json").read_text())
    layers = cross_attention_layers(config)
    assert tuple(layer.key for layer in layers) == SD_LAYERS
    assert [layer.module for layer in layers][:3] == ["down_blocks.0.attentions.0", "down_blocks.0.attentions.1",
                                                      "down_blocks.1.attentions.0"]
    assert layers[6].module == "mid_block.attentions.0" and layers[7].module == "up_blocks.1.attentions.0"
    for layer in layers:
        [ldm] = unet_to_ldm({f"{layer.attn2}.to_k.weight": 0}, config)
        block = ldm.split(".")[2:4]  # model.diffusion_model.input_blocks.N.1.… / middle_block.1.…
        expected = {"input_blocks": f"IN{int(block[1]):02d}", "output_blocks": f"OUT{int(block[1]):02d}"}
        assert expected.get(block[0], "MID") == layer.key
    for name in ("sd21", "sd2-base"):  # SD 2.x: the same 16
        config = json.loads((CONFIGS / name / "unet" / "config.json").read_text())
        assert tuple(layer.key for layer in cross_attention_layers(config)) == SD_LAYERS


def test_sdxl_and_stacked_layouts_have_no_per_layer_mapping():
    from engine.sd.models import model_info

    assert model_info("builtin:tiny").layers == TINY_LAYERS
    assert model_info("builtin:sd15-arch").layers == SD_LAYERS
    info = model_info("builtin:sdxl-tiny")
    assert info.layers == ()
    with pytest.raises(UserError, match=r"^--per-layer: builtin:sdxl-tiny \(SDXL\) cannot take per-layer words: "
                                        r"SDXL's 70 cross-attention layers.*without --per-layer$"):
        info.require_layers()
    stacked = json.loads((CONFIGS / "sdxl" / "unet" / "config.json").read_text())
    with pytest.raises(UserError, match="stacks several transformer layers"):
        cross_attention_layers(stacked)


# --- how each layer reads its own ---------------------------------------------------------------------------


def _attn2_inputs(model, inversion, batch):
    """The encoder hidden states each cross-attention layer received in one training forward."""
    from engine.sd.per_layer import unet_layers

    seen, handles = {}, []
    for layer in unet_layers(model):
        module = model.unet.get_submodule(layer.attn2)
        handles.append(module.register_forward_hook(
            lambda m, a, kw, out, key=layer.key: seen.__setitem__(key, kw["encoder_hidden_states"].clone()),
            with_kwargs=True))
    try:
        with inversion.installed(), torch.no_grad():
            inversion._loss_rows(batch)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def test_each_layer_reads_the_prompt_encoded_with_its_own_vectors(tiny_model, image_dir, tmp_path):
    """Layer l's cross-attention gets the prompt encoded with layer l's vectors, and only those; with every
    layer's vectors equal, the loss is the plain word's exactly."""
    from engine.inversion.train import Inversion

    images = _images(image_dir)
    per_layer = Inversion(tiny_model, [RunSlot(_cfg(), tmp_path / "p", images)])
    plain = Inversion(tiny_model, [RunSlot(_cfg(per_layer=False), tmp_path / "q", images)])
    assert per_layer.layout.layers == 4 and per_layer.vectors.shape == (1, 4 * 32)
    batch_p, batch_q = per_layer._draw()[0], plain._draw()[0]
    losses = []
    for inversion, batch in ((per_layer, batch_p), (plain, batch_q)):
        with inversion.installed(), torch.no_grad():
            losses.append(inversion._loss_rows(batch))
    assert torch.equal(*losses)
    with torch.no_grad():
        per_layer.vectors[0, 32:64] += 3.0  # layer 1 (MID) only
    seen = _attn2_inputs(tiny_model, per_layer, batch_p)
    base = _attn2_inputs(tiny_model, plain, batch_q)
    changed = [key for key in TINY_LAYERS if not torch.equal(seen[key], base[key])]
    assert changed == ["MID"]


def test_per_layer_training_moves_every_layer_apart_and_resumes_bit_for_bit(tiny_model, image_dir, tmp_path):
    images = _images(image_dir)
    reporter = QuietReporter()
    path = train(tiny_model, _cfg(seed=3), tmp_path / "full", images, reporter)
    emb = read_embedding(path)
    assert (emb.format, emb.layers, emb.num_vectors) == ("kohya-xti", TINY_LAYERS, 1)
    assert set(safetensors.torch.load_file(str(path))) == set(TINY_LAYERS)  # kohya's file, our run's own
    start = tiny_model.text_encoder.get_input_embeddings().weight[tiny_model.tokenizer.convert_tokens_to_ids(
        "cat</w>")].float()
    for i in range(4):  # each layer learned its own vector from the same start
        assert not torch.equal(emb.vectors[i], start)
        assert all(not torch.equal(emb.vectors[i], emb.vectors[j]) for j in range(i))
    header = next(e for e in reporter.events if e["type"] == "train")
    assert header["layers"] == list(TINY_LAYERS)

    class CancelAt(QuietReporter):
        def cancelled(self):
            return any(e["type"] == "step" and e["step"] >= 4 for e in self.events)

    with pytest.raises(JobCancelled):
        train(tiny_model, _cfg(seed=3), tmp_path / "cut", images, CancelAt())
    meta = json.loads(next((tmp_path / "cut" / "checkpoints").glob("step-*/meta.json")).read_text())
    assert meta["layers"] == 4
    resumed = read_embedding(train(tiny_model, _cfg(seed=3), tmp_path / "cut", images)).vectors
    assert torch.equal(emb.vectors, resumed)
    with pytest.raises(UserError, match="--per-layer"):  # a plain run cannot resume a per-layer checkpoint
        train(tiny_model, _cfg(seed=3, per_layer=False, steps=12), tmp_path / "cut", images)


# --- generation and Table 1 ----------------------------------------------------------------------------------


@pytest.fixture
def library(image_dir):
    lib = Library(home_dir())
    lib.add("cat", image_dir, "cat", description="a small grey cat")
    return lib


def _done_run(concept, run_id: str, vectors: torch.Tensor, layers=TINY_LAYERS) -> Path:
    from engine.store.paths import atomic_write_json

    run_dir = concept.runs_dir / run_id
    path = write_embedding(run_dir / "learned_embeds.safetensors", vectors, concept.token, "kohya-xti", layers=layers)
    atomic_write_json(run_dir / "run.json", {"id": run_id, "kind": "train", "status": "done", "created": 1.0,
                                             "params": {"per_layer": True, "vectors": 1}})
    return path


def test_generation_with_a_per_layer_word(tiny_model, library):
    """Equal layers draw exactly the plain word's images; each layer's vector changes them."""
    from engine.sd.generation import render, resolve_embeddings

    concept, prompt = library.get("cat"), "a photo of <cat> on a beach"
    vector = torch.randn(1, 32, generator=torch.Generator().manual_seed(2)) * 3
    write_embedding(concept.runs_dir / "plain" / "learned_embeds.safetensors", vector, concept.token)
    (concept.runs_dir / "plain" / "run.json").write_text(json.dumps(
        {"id": "plain", "kind": "train", "status": "done", "created": 1.0}))
    _done_run(concept, "same", vector.repeat(4, 1))
    images = {run: render(tiny_model, prompt, [3, 4], steps=2, output_type="np",
                          used=resolve_embeddings(library, prompt, [f"cat@{run}"])) for run in ("plain", "same")}
    assert np.array_equal(np.stack(images["plain"]), np.stack(images["same"]))
    changed = vector.repeat(4, 1)
    changed[3] += 4  # OUT01 only
    _done_run(concept, "other", changed)
    other = render(tiny_model, prompt, [3], steps=2, output_type="np",
                   used=resolve_embeddings(library, prompt, ["cat@other"]))
    assert not np.array_equal(other[0], images["same"][0])
    assert tiny_model.unet.get_submodule("mid_block.attentions.0.transformer_blocks.0.attn2")._forward_pre_hooks == {}


def test_table_1_of_a_per_layer_run(tiny_model, library, tmp_path):
    from engine.inversion.metrics import evaluate

    concept = library.get("cat")
    _done_run(concept, "r1", torch.randn(4, 32, generator=torch.Generator().manual_seed(1)))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a {} on a beach\n")
    table = evaluate(tiny_model, library, "cat", "r1", images=2, prompts_file=prompts, clip="builtin:tiny",
                     sample_steps=2)
    rows = {r["model"]: r for r in table["rows"]}
    assert set(rows) == {"SD", "SD+TI"} and rows["SD+TI"]["reconstruction"] != rows["SD"]["reconstruction"]


# --- kohya's XTI files, both ways --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd15_layout(tmp_path_factory) -> str:
    """A diffusers folder with SD 1.5's UNet layout (16 cross-attention layers) at tiny sizes."""
    from diffusers import UNet2DConditionModel

    from engine.sd.models import load_model

    folder = tmp_path_factory.mktemp("sd15-layout") / "model"
    config = json.loads((CONFIGS / "tiny" / "unet" / "config.json").read_text())
    config.update(block_out_channels=[32, 32, 32, 32], layers_per_block=2,
                  down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                  up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
    pipe = load_model("builtin:tiny").pipe
    torch.manual_seed(0)
    pipe.unet = UNet2DConditionModel.from_config(config)
    pipe.save_pretrained(folder)
    return str(folder)


def test_xti_round_trip_is_bit_exact_on_sd15s_16_layers(capsys, monkeypatch, tmp_path, sd15_layout):
    from engine.sd.generation import load_used
    from engine.sd.models import model_info

    monkeypatch.setenv("TISTUDIO_MODEL", sd15_layout)
    assert model_info(sd15_layout).layers == SD_LAYERS
    data = {key: torch.randn(2, 32, generator=torch.Generator().manual_seed(i)) for i, key in enumerate(SD_LAYERS)}
    source = tmp_path / "shiny.safetensors"
    safetensors.torch.save_file(data, str(source))  # as kohya's save_weights writes it
    code, out, err = run_cli(capsys, "import", str(source), "--json")
    assert code == 0, err
    assert json.loads(out)["vectors"] == 2
    used = load_used(Library(Path(os.environ["TISTUDIO_HOME"])).get("shiny"))
    assert used.layers == SD_LAYERS and torch.equal(used.vectors, torch.cat([data[k] for k in SD_LAYERS]))
    out_file = tmp_path / "again.safetensors"
    assert run_cli(capsys, "export", "shiny", "--format", "kohya-xti", "--out", str(out_file))[0] == 0
    again = safetensors.torch.load_file(str(out_file))
    assert list(again) == list(SD_LAYERS) and all(torch.equal(again[k], data[k]) for k in SD_LAYERS)
    assert out_file.read_bytes() == source.read_bytes()  # byte for byte what kohya wrote
    from engine.sd.generation import render
    from engine.sd.models import load_model

    model = load_model(sd15_layout)
    image = render(model, "a <shiny>", [0], steps=1, output_type="np", used=[used])[0]
    assert np.isfinite(image).all()


def test_refusals_write_nothing(capsys, monkeypatch, tmp_path, image_dir):
    home = Path(os.environ["TISTUDIO_HOME"])
    # an XTI file of 16 layers on a model with 4; one of another width
    sixteen = tmp_path / "sixteen.safetensors"
    safetensors.torch.save_file({k: torch.ones(1, 32) for k in SD_LAYERS}, str(sixteen))
    wide = tmp_path / "wide.safetensors"
    safetensors.torch.save_file({k: torch.ones(1, 768) for k in TINY_LAYERS}, str(wide))
    for path, needle in ((sixteen, "per-layer (XTI) word of 16 layers (IN01…OUT11) does not fit builtin:tiny, "
                                   "whose UNet has cross-attention 4 layers (IN03…OUT01)"),
                         (wide, "an embedding for SD 1.x (width 768) does not fit builtin:tiny")):
        code, _, err = run_cli(capsys, "import", str(path))
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1
        assert not (home / "concepts").exists() or not any((home / "concepts").iterdir())
    # exporting a per-layer word to a format with no place for layers
    assert run_cli(capsys, "import", str(_tiny_xti(tmp_path)), "--name", "xti")[0] == 0
    for fmt in ("diffusers", "a1111", "kohya", "a1111-png"):
        out = tmp_path / f"out-{fmt}"
        code, _, err = run_cli(capsys, "export", "xti", "--format", fmt, "--out", str(out))
        assert code == 2 and "--format kohya-xti" in err and len(err.strip().splitlines()) == 1
        assert not list(tmp_path.glob(f"out-{fmt}*"))
    # --per-layer on SDXL: refused before anything is submitted
    monkeypatch.setenv("TISTUDIO_MODEL", "builtin:sdxl-tiny")
    assert run_cli(capsys, "concept", "add", "toy", "--images", str(image_dir), "--init", "cat")[0] == 0
    before = sorted(p.name for p in (home / "concepts" / "toy").rglob("*"))
    code, _, err = run_cli(capsys, "train", "toy", "--per-layer", "--steps", "2", "--detach")
    assert code == 2 and "SDXL's 70 cross-attention layers" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in (home / "concepts" / "toy").rglob("*")) == before


def _tiny_xti(tmp_path: Path) -> Path:
    path = tmp_path / "tiny-xti.safetensors"
    safetensors.torch.save_file({k: torch.randn(1, 32) for k in TINY_LAYERS}, str(path))
    return path


# --- inspect and merge -----------------------------------------------------------------------------------


def test_inspect_and_merge_go_layer_by_layer(tiny_model, library):
    from engine.inversion.inspector import inspect_word
    from engine.inversion.merge import concat, mix
    from engine.sd.formats import Embedding

    concept = library.get("cat")
    per_layer = torch.randn(4, 32, generator=torch.Generator().manual_seed(3))
    _done_run(concept, "r1", per_layer)
    report = inspect_word(tiny_model, library, "cat", run="r1", top=2)
    assert report["vectors"] == 1 and report["layers"] == list(TINY_LAYERS)
    [encoder] = report["encoders"]
    assert [v["layer"] for v in encoder["vectors"]] == list(TINY_LAYERS)
    assert {v["index"] for v in encoder["vectors"]} == {0}
    assert encoder["vectors"][2]["norm"] == pytest.approx(float(per_layer[2].norm()), rel=1e-6)

    word = Embedding(per_layer, None, "kohya-xti", layers=TINY_LAYERS)
    plain = Embedding(torch.ones(1, 32), None, "diffusers")
    [mixed] = mix([word, plain], [0.5, 0.5])
    assert torch.allclose(mixed, 0.5 * per_layer + 0.5)  # the plain word in every layer
    [joined] = concat([word, plain])
    assert joined.shape == (8, 32) and torch.equal(joined.view(4, 2, 32)[:, 0], per_layer)
    assert torch.equal(joined.view(4, 2, 32)[:, 1], torch.ones(4, 32))
    other = Embedding(torch.zeros(16, 32), None, "kohya-xti", layers=SD_LAYERS)
    with pytest.raises(UserError, match="different layers"):
        mix([word, other], [0.5, 0.5])


def test_low_vram_recomputes_each_layers_states(tiny_model, image_dir, tmp_path):
    """Under gradient checkpointing the UNet's forward runs again in backward: the hook, keyed to the
    step's conditioning, hands every layer the same states then, so the run is the same bit for bit."""
    images = _images(image_dir)
    words = [read_embedding(train(tiny_model, _cfg(steps=4, low_vram=low), tmp_path / str(low), images)).vectors
             for low in (False, True)]
    assert torch.equal(*words)
