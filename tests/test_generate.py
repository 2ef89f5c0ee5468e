"""Generation: diffusers parity, metadata, SD/TI/compare modes, --use, the shared model left alone."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image

from engine.errors import JobCancelled, UserError
from engine.inversion.train import TrainConfig, train
from engine.sd.formats import embedding_sha256, write_embedding
from engine.sd.generation import (
    GenerateRequest,
    a1111_parameters,
    generate,
    generation_scheduler,
    make_grid,
    parse_use,
    render,
    resolve_embeddings,
    step_file,
    with_descriptions,
)
from engine.store.library import Library
from engine.store.paths import atomic_write_json, home_dir

PROMPT = "a photo of <cat> on the beach"


@pytest.fixture
def library(image_dir):
    lib = Library(home_dir())
    lib.add("cat", image_dir, "cat", description="a small grey cat")
    return lib


def fake_run(concept, run_id, vectors, *, steps=(), status="done", created=1.0, final_steps=10):
    """A run directory as training leaves it, with chosen vectors (width 32: the tiny model's)."""
    run_dir = concept.runs_dir / run_id
    if status == "done":
        write_embedding(run_dir / "learned_embeds.safetensors", vectors, concept.token)
    for s in steps:
        write_embedding(step_file(run_dir, s), vectors + s, concept.token)
    atomic_write_json(run_dir / "run.json", {"id": run_id, "status": status, "created": created, "steps": final_steps})
    return run_dir


def vec(seed=0, n=1):
    return torch.randn(n, 32, generator=torch.Generator().manual_seed(seed))


def pixels(path):
    with Image.open(path) as im:
        return np.array(im)


def reference_pipe(model, embedding_path, token):
    """Plain diffusers: StableDiffusionPipeline + DPM-Solver++ + load_textual_inversion, on copies."""
    from diffusers import StableDiffusionPipeline

    components = {**model.pipe.components, "scheduler": generation_scheduler(model),
                  "tokenizer": copy.deepcopy(model.tokenizer), "text_encoder": copy.deepcopy(model.text_encoder)}
    pipe = StableDiffusionPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_textual_inversion(str(embedding_path), token=token)
    return pipe


# --- parity with diffusers ----------------------------------------------------------------------


def test_ti_images_equal_diffusers_load_textual_inversion_bit_for_bit(tiny_model, library):
    concept = library.get("cat")
    run_dir = concept.runs_dir / "trained"
    cfg = TrainConfig(token=concept.token, init="cat", steps=3, lr=5e-2, save_every=3, preview_every=0, log_every=1)
    path = train(tiny_model, cfg, run_dir, concept.images)
    atomic_write_json(run_dir / "run.json", {"id": "trained", "status": "done", "created": 1.0, "steps": 3})

    seeds, kw = [11, 12, 13], dict(num_inference_steps=3, guidance_scale=7.5, height=64, width=64)
    results = generate(tiny_model, library, GenerateRequest(PROMPT, negative="blurry", n=3, seed=11, steps=3,
                                                            batch_size=3, out_dir=home_dir() / "out"))
    ref = reference_pipe(tiny_model, path, concept.token)
    expected = ref(PROMPT, negative_prompt="blurry", num_images_per_prompt=3,
                   generator=[torch.Generator().manual_seed(s) for s in seeds], **kw).images
    for result, image in zip(results, expected):
        assert np.array_equal(pixels(result["path"]), np.array(image))

    # And before quantisation to 8 bits: the float images are identical too.
    ours = render(tiny_model, PROMPT, seeds, negative="blurry", steps=3, batch_size=3,
                  used=resolve_embeddings(library, PROMPT, []), output_type="np")
    theirs = ref(PROMPT, negative_prompt="blurry", num_images_per_prompt=3, output_type="np",
                 generator=[torch.Generator().manual_seed(s) for s in seeds], **kw).images
    assert np.array_equal(np.stack(ours), theirs)


def test_learned_vector_changes_the_image(tiny_model, library):
    """Guards the parity test against a no-op: the embedding must reach the UNet."""
    concept = library.get("cat")
    fake_run(concept, "a", vec(1) * 5, created=1.0)
    fake_run(concept, "b", vec(2) * 5, created=2.0)
    a = render(tiny_model, PROMPT, [0], steps=2, used=resolve_embeddings(library, PROMPT, ["cat@a"]), output_type="np")
    b = render(tiny_model, PROMPT, [0], steps=2, used=resolve_embeddings(library, PROMPT, ["cat@b"]), output_type="np")
    assert not np.array_equal(a[0], b[0])


def test_shared_model_unchanged_after_generation_and_after_a_cancel(tiny_model, library):
    fake_run(library.get("cat"), "r1", vec())
    tok, te = tiny_model.tokenizer, tiny_model.text_encoder
    before = (len(tok), dict(tok.get_added_vocab()), te.get_input_embeddings(),
              te.get_input_embeddings().weight.detach().clone())
    generate(tiny_model, library, GenerateRequest(PROMPT, n=2, steps=2, mode="compare"))
    with pytest.raises(JobCancelled):
        generate(tiny_model, library, GenerateRequest(PROMPT, n=2, steps=2), cancelled=lambda: True)
    assert len(tok) == before[0]
    assert tok.get_added_vocab() == before[1]
    assert te.get_input_embeddings() is before[2]
    assert torch.equal(te.get_input_embeddings().weight, before[3])
    assert "<cat>" not in tok.get_vocab()


# --- metadata -----------------------------------------------------------------------------------


def test_png_parameters_chunk_and_sidecar(tiny_model, library):
    concept = library.get("cat")
    fake_run(concept, "r1", vec(), final_steps=10)
    [result] = generate(tiny_model, library, GenerateRequest(PROMPT, negative="blurry", n=1, seed=42, steps=2,
                                                              guidance=7.5))
    assert result["mode"] == "ti" and result["seed"] == 42 and result["path"].endswith("ti-0042.png")
    sha = embedding_sha256(vec())
    fingerprint = tiny_model.info.identity()["fingerprint"]
    with Image.open(result["path"]) as im:
        params, stored = im.text["parameters"], json.loads(im.text["tistudio"])
    assert params == (
        f"{PROMPT}\nNegative prompt: blurry\n"
        f"Steps: 2, Sampler: DPM++ 2M, CFG scale: 7.5, Seed: 42, Size: 64x64, Model hash: {fingerprint[:10]}, "
        f'Model: builtin:tiny, TI hashes: "<cat>: {sha[:12]}", TI runs: "<cat>: cat@r1:final", Version: tistudio'
    )
    sidecar = json.loads(open(result["json"]).read())
    assert sidecar == stored
    assert sidecar["prompt"] == PROMPT and sidecar["negative_prompt"] == "blurry"
    assert (sidecar["seed"], sidecar["steps"], sidecar["guidance"], sidecar["batch_size"]) == (42, 2, 7.5, 1)
    assert "DPMSolverMultistep" in sidecar["scheduler"] and "dpmsolver++" in sidecar["scheduler"]
    assert sidecar["model"] == tiny_model.info.identity()
    [emb] = sidecar["embeddings"]
    assert (emb["concept"], emb["token"], emb["run"], emb["step"], emb["sha256"]) == ("cat", "<cat>", "r1", 10, sha)


def test_a1111_text_omits_empty_negative_and_quotes_commas():
    record = {"prompt": "p", "negative_prompt": "", "steps": 25, "sampler": "DPM++ 2M", "guidance": 7.0, "seed": 1,
              "width": 512, "height": 512, "model": {"fingerprint": "0123456789abcdef", "spec": "/m/a,b.safetensors"},
              "embeddings": []}
    assert a1111_parameters(record) == ('p\nSteps: 25, Sampler: DPM++ 2M, CFG scale: 7, Seed: 1, Size: 512x512, '
                                        'Model hash: 0123456789, Model: "/m/a,b.safetensors", Version: tistudio')


# --- modes --------------------------------------------------------------------------------------


def test_sd_mode_uses_the_description_and_needs_no_run(tiny_model, library):
    results = generate(tiny_model, library, GenerateRequest("a photo of <CAT>, no <cat>s", n=2, seed=3, steps=2,
                                                             mode="sd"))
    assert [r["mode"] for r in results] == ["sd", "sd"]
    assert [r["seed"] for r in results] == [3, 4]
    assert results[0]["prompt"] == "a photo of a small grey cat, no a small grey cats"
    sidecar = json.loads(open(results[0]["json"]).read())
    assert sidecar["embeddings"] == [] and sidecar["prompt"] == results[0]["prompt"]
    with Image.open(results[0]["path"]) as im:
        assert "TI hashes" not in im.text["parameters"]


def test_compare_renders_both_with_the_same_seeds(tiny_model, library):
    fake_run(library.get("cat"), "r1", vec())
    out = home_dir() / "cmp"
    results = generate(tiny_model, library, GenerateRequest(PROMPT, n=2, seed=7, steps=2, mode="compare", out_dir=out))
    sd = [r for r in results if r["mode"] == "sd"]
    ti = [r for r in results if r["mode"] == "ti"]
    assert [r["seed"] for r in sd] == [r["seed"] for r in ti] == [7, 8]
    assert sd[0]["prompt"] == "a photo of a small grey cat on the beach" and ti[0]["prompt"] == PROMPT
    assert (out / "compare.png").is_file() and (out / "sd-0007.png").is_file() and (out / "ti-0008.png").is_file()
    # The SD half is exactly a plain SD generation of the described prompt.
    alone = generate(tiny_model, library, GenerateRequest(sd[0]["prompt"], n=2, seed=7, steps=2, mode="sd"))
    assert np.array_equal(pixels(alone[0]["path"]), pixels(sd[0]["path"]))


def test_default_output_dir_is_under_home_outputs(tiny_model, library):
    [r] = generate(tiny_model, library, GenerateRequest("a red ball", n=1, steps=1, mode="sd"))
    assert r["path"].startswith(str(home_dir() / "outputs")) and "-a-red-ball" in r["path"]


# --- which embedding ------------------------------------------------------------------------------


def test_token_without_finished_run_is_a_user_error(tiny_model, library):
    with pytest.raises(UserError, match="no finished training run.*--use cat@RUN:STEP"):
        generate(tiny_model, library, GenerateRequest(PROMPT, steps=1))
    fake_run(library.get("cat"), "r1", vec(), status="running", steps=[5])
    with pytest.raises(UserError, match="no finished training run"):
        resolve_embeddings(library, PROMPT, [])
    [used] = resolve_embeddings(library, PROMPT, ["cat@r1:5"])  # a checkpoint of a running run is fine
    assert used.step == 5 and not used.final


def test_latest_done_run_by_default_and_use_picks_run_and_step(library):
    concept = library.get("cat")
    fake_run(concept, "old", vec(1), steps=[5, 10], created=1.0)
    fake_run(concept, "new", vec(2), created=2.0)
    fake_run(concept, "broken", vec(3), status="failed", created=3.0)
    [used] = resolve_embeddings(library, PROMPT, [])
    assert (used.run, used.final, used.sha256) == ("new", True, embedding_sha256(vec(2)))
    [used] = resolve_embeddings(library, PROMPT, ["cat@old"])
    assert (used.run, used.step, used.final) == ("old", 10, True)
    [used] = resolve_embeddings(library, PROMPT, ["cat@old:5"])
    assert used.path.name == "learned_embeds-steps-5.safetensors"
    assert torch.equal(used.vectors, vec(1) + 5) and used.ref == "cat@old:5"


def test_several_concepts_in_one_prompt(tiny_model, library, image_dir):
    library.add("dog", image_dir, "dog", description="a brown dog")
    fake_run(library.get("cat"), "c1", vec(1))
    fake_run(library.get("dog"), "d1", vec(2))
    prompt = "<dog> chasing <cat>"
    used = resolve_embeddings(library, prompt, [])
    assert [(u.concept, u.run) for u in used] == [("dog", "d1"), ("cat", "c1")]
    [r] = generate(tiny_model, library, GenerateRequest(prompt, steps=1))
    with Image.open(r["path"]) as im:
        assert '"<dog>: ' in im.text["parameters"] and ", <cat>: " in im.text["parameters"]
    assert with_descriptions(prompt, library.list()) == "a brown dog chasing a small grey cat"


@pytest.mark.parametrize("spec, parsed", [
    ("cat", ("cat", None, None)), ("cat@r1", ("cat", "r1", None)), ("cat:500", ("cat", None, 500)),
    ("cat@20261126-031500-ab12:1500", ("cat", "20261126-031500-ab12", 1500)),
])
def test_parse_use(spec, parsed):
    assert parse_use(spec) == parsed


@pytest.mark.parametrize("spec, message", [
    ("", "empty"), ("cat@r1:abc", "not a number"), ("cat@:5", "not a run id"), ("cat@r/1", "not a run id"),
])
def test_parse_use_errors(spec, message):
    with pytest.raises(UserError, match=message):
        parse_use(spec)


@pytest.mark.parametrize("uses, message", [
    (["dog@r1"], "no concept named 'dog'"),
    (["cat@nope"], "no run 'nope'"),
    (["cat@r1:7"], "no embedding at step 7; steps saved: 5"),
    (["cat", "cat@r1"], "twice"),
])
def test_use_errors(library, uses, message):
    fake_run(library.get("cat"), "r1", vec(), steps=[5])
    with pytest.raises(UserError, match=message):
        resolve_embeddings(library, PROMPT, uses)


def test_use_of_a_concept_missing_from_the_prompt(library):
    fake_run(library.get("cat"), "r1", vec())
    with pytest.raises(UserError, match="token <cat> is not in the prompt"):
        resolve_embeddings(library, "a photo of a dog", ["cat@r1"])


def test_embedding_of_another_width_is_refused(tiny_model, library):
    fake_run(library.get("cat"), "r1", torch.randn(1, 768))
    with pytest.raises(UserError, match="width 768"):
        generate(tiny_model, library, GenerateRequest(PROMPT, steps=1))


@pytest.mark.parametrize("field, value", [("n", 0), ("steps", 0), ("mode", "xl"), ("batch_size", 0),
                                          ("resolution", 60), ("seed", -1)])
def test_request_validation(tiny_model, library, field, value):
    with pytest.raises(UserError):
        generate(tiny_model, library, GenerateRequest("a cat", **{field: value}))


def test_make_grid_layout():
    images = [Image.new("RGB", (20, 10), (i * 40, 0, 0)) for i in range(6)]
    plain = make_grid(images, 2, 3, pad=2)
    assert plain.size == (3 * 22 + 2, 2 * 12 + 2)
    assert plain.getpixel((2, 2)) == (0, 0, 0) and plain.getpixel((2 + 22, 2)) == (40, 0, 0)
    labelled = make_grid(images, 2, 3, [str(i) for i in range(6)], row_labels=["a", "b"], col_labels=["x", "y", "z"])
    assert labelled.size[0] > plain.size[0] and labelled.size[1] > plain.size[1]
    with pytest.raises(ValueError):
        make_grid(images, 1, 3)
