"""builtin:demo: the world, the shipped weights and their two quality checks."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from demo import world as W
from engine.sd import demo_model

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "demo" / "samples"
needs_weights = pytest.mark.skipif(not demo_model.weights_present(), reason="builtin:demo weights not built yet")


@pytest.fixture(scope="module")
def tokenizer():
    from engine.sd.tokenizer import load_clip_tokenizer

    return load_clip_tokenizer()


@pytest.fixture(scope="module")
def judge():
    torch.manual_seed(0)
    model, preprocess, tok = demo_model.load_demo_clip()
    return model, preprocess, tok


# --- the world -------------------------------------------------------------------------------------


def test_world_is_deterministic():
    a = W.render_batch(W.scenes(5, 20))
    b = W.render_batch(W.scenes(5, 20))
    assert a.shape == (20, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, W.render_batch(W.scenes(6, 20)))


def test_captions_are_single_clip_tokens_and_never_name_the_held_out_concepts(tokenizer):
    rng = np.random.default_rng(0)
    scenes = W.scenes(3, 400)
    words, late, named = set(), set(), set()
    for s in scenes:
        words.update(W.caption(s, rng).split())
        words.update(W.caption(s, rng, variety=2).split())
        for _ in range(3):  # each name is drawn 40% of the time: say them all at least once
            late.update(W.caption(s, rng, variety=3).split())
        named.update(W.caption(s, rng, names=True).split())
    for w in words | late | named:
        assert len(tokenizer(w, add_special_tokens=False).input_ids) == 1, w
    secret = set(W.TOY_NAMES.values()) | set(W.STYLE_NAMES.values())
    held_out = {W.TOY_NAMES.get(n) or W.STYLE_NAMES[n] for n in W.HELD_OUT}
    assert not words & secret  # the generator's first captions never name them
    assert late & secret == secret - held_out  # its later ones name all but the demo concepts
    assert secret <= named  # the judge's do
    assert any(s.toy for s in scenes) and any(s.style for s in scenes)


def test_sample_library():
    records = json.loads((SAMPLES / "concepts.json").read_text())
    assert {r["property"] for r in records} == {"object", "style"}
    from PIL import Image

    from engine.sd.tokenizer import load_clip_tokenizer

    tok = load_clip_tokenizer()
    for r in records:
        assert len(tok(r["init"], add_special_tokens=False).input_ids) == 1
        assert 4 <= len(r["images"]) <= 5
        for name in r["images"]:
            with Image.open(SAMPLES / r["name"] / name) as im:
                assert im.size[0] >= 64 and im.size[1] >= 64
        assert all(p.count("{}") == 1 for p in r["edit_prompts"])


# --- the text tower: open_clip and transformers agree ----------------------------------------------


def _compare_towers(clip_model, text_encoder, prompts):
    import open_clip

    oc_ids = open_clip.tokenizer.tokenize(prompts)
    from engine.sd.tokenizer import load_clip_tokenizer

    hf_ids = load_clip_tokenizer()(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        x = clip_model.token_embedding(oc_ids) + clip_model.positional_embedding
        x = clip_model.ln_final(clip_model.transformer(x, attn_mask=clip_model.attn_mask))
        hf = text_encoder(hf_ids)[0]
    for i in range(len(prompts)):
        n = int((oc_ids[i] != 0).sum())  # BOS ... EOS; after it the two pad differently
        assert torch.equal(oc_ids[i, :n], hf_ids[i, :n])
        torch.testing.assert_close(hf[i, :n], x[i, :n], atol=2e-5, rtol=1e-4)


def test_text_encoder_equals_open_clip_text_tower_random_weights():
    torch.manual_seed(0)
    clip_model = demo_model.build_clip().eval()
    for p in clip_model.parameters():  # make every weight matter
        p.data.normal_(0, 0.1)
    text_encoder = demo_model.build_text_encoder(clip_model.state_dict())
    _compare_towers(clip_model, text_encoder, ["a big red circle on the left", "a toy", "", "a painting of a star"])


@needs_weights
def test_pipeline_text_encoder_is_the_judges_text_tower(judge):
    pipe = demo_model.build_demo_pipeline()
    _compare_towers(judge[0], pipe.text_encoder, [W.caption(s, full=True) for s in W.scenes(4, 6)])


# --- the shipped weights ---------------------------------------------------------------------------


@needs_weights
def test_weights_are_small_and_pipeline_builds_fast():
    total = sum(p.stat().st_size for p in demo_model.WEIGHTS.iterdir())
    assert total <= 30 * 2**20, total
    demo_model.build_demo_pipeline()  # warm imports and the tokenizer cache
    t = time.process_time()  # CPU seconds: a busy machine does not count against it
    pipe = demo_model.build_demo_pipeline()
    assert time.process_time() - t < 6.0
    assert pipe.safety_checker is None
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert pipe.vae.config.scaling_factor != 1.0  # set from the latents' spread at training time
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size


@needs_weights
def test_judge_zero_shot_shape_and_colour(judge):
    """Quality check 1: zero-shot shape and colour on fresh world pictures >= 95%."""
    from demo.common import shape_colour_accuracy

    model, preprocess, _ = judge
    scenes = [W.sample_scene(np.random.default_rng(1000 + i), toy="", style="") for i in range(400)]
    from PIL import Image

    # through the judge's own preprocess, from the 128-px PNG form the library holds
    images = torch.stack([preprocess(Image.fromarray(W.upsample(W.render(s), 4))) for s in scenes])
    acc = shape_colour_accuracy(model, images, scenes)
    print("zero-shot", acc)
    assert acc["shape"] >= 0.95 and acc["colour"] >= 0.95, acc


@needs_weights
def test_generated_pictures_show_the_prompted_shape_and_colour(judge):
    """Quality check 2: for in-distribution prompts the judge names shape and colour >= 80%."""
    from demo.train_t2i import generation_check

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    pipe = demo_model.build_demo_pipeline()
    report, images = generation_check(pipe, judge[0], n=48, steps=20, guidance=5.0)
    print("generation", report)
    assert images.shape == (48, 32, 32, 3)
    assert report["both"] >= 0.8, report


def test_bundled_text_encoder_config_matches_the_judge():
    config = json.loads((demo_model.CONFIGS / "text_encoder" / "config.json").read_text())
    expected = demo_model.text_encoder_config()
    assert {k: config[k] for k in expected} == expected
    from engine.sd.models import model_info

    info = model_info("builtin:demo")
    assert (info.resolution, info.text_width, info.family) == (32, 64, "sd1")


# --- the paper's inversion on the demo, measured: one logged frontier cell, and issue 15's table ----

RECON_FLOOR, STYLE_LOSS = 0.38, 0.02  # issue 15's bar on builtin:demo
LOGGED_TOLERANCE = 1e-4  # the cell trains in a batch of 2, not of 60 as logged: sums round differently (~3e-6)
# The one-seed table per regulariser (README, "Keeping the word editable"): six 2000-step runs and
# eight measured columns, 5 to 10 CPU-minutes; `make test-study` runs it, `make test` does not.
STUDY_ENV = "TISTUDIO_TEST_STUDY"


@needs_weights
@pytest.mark.timeout(1200)
def test_the_papers_inversion_on_the_demo_reproduces_its_logged_frontier_cell(capsys):
    """Train the paper's inversion on mushroom (and halftone, under `make test-study`) as demo.frontier
    did (the engine's own batched inversion, then each run measured as `tistudio eval` measures it with the demo judge)
    and check: the numbers are demo/logs' for that seed, so the README's table over seeds is what
    this code gives; and the learned word beats the plain prompt's reconstruction, as in the paper.
    The measurement runs in a process of its own, begun when the suite began
    (tests/demo_measurement.py)."""
    import demo_measurement as M

    results = M.start().results(timeout=1100)  # begun when the suite began, if it runs more
    assert set(results) == set(M.CONCEPTS)
    label = f"{M.METHOD} · seed {M.SEED}"
    for name, result in results.items():
        logged = json.loads((REPO / "demo" / "logs" / f"frontier-{name}.json").read_text())
        assert (logged["steps"], logged["lr"], logged["images"]) == (M.STEPS, M.LR, M.IMAGES) == (
            result["steps"], result["lr"], result["images"])
        assert result["prompts"] == logged["prompts"] and result["clip"]["name"] == "builtin:demo"
        rows, logged_rows = ({r["label"]: r for r in rs} for rs in (result["rows"], logged["rows"]))
        assert list(rows) == [label]  # --no-baseline: the SD row is the log's
        ours, theirs, sd = rows[label], logged_rows[label], logged_rows["SD"]
        with capsys.disabled():
            print(f"\n{name}, {label}, {M.STEPS} steps, {M.IMAGES} images a set: reconstruction "
                  f"{ours['reconstruction']:.4f} (logged {theirs['reconstruction']:.4f}, SD {sd['reconstruction']:.4f})"
                  f", editability {ours['editability']:.4f} (logged {theirs['editability']:.4f}, "
                  f"SD {sd['editability']:.4f})")
        for key in ("reconstruction", "editability"):
            assert ours[key] == pytest.approx(theirs[key], abs=LOGGED_TOLERANCE), (name, key)
        assert ours["per_prompt"] == pytest.approx(theirs["per_prompt"], abs=LOGGED_TOLERANCE), name
        assert ours["reconstruction"] >= sd["reconstruction"] + 0.05, (name, ours, sd)  # the paper's inversion works


@needs_weights
@pytest.mark.skipif(not os.environ.get(STUDY_ENV), reason=f"the one-seed table: `make test-study` ({STUDY_ENV}=1)")
@pytest.mark.timeout(2400)
def test_regularised_inversion_on_the_demo(tmp_path, capsys):
    """The README's one-seed table per regulariser: invert the held-out concepts with the paper's
    method and the regularisers (`python -m demo.regularize_sweep`: the engine's batched inversion,
    then Table 1 with the demo judge, the world's edit prompts and the same seeds for every column),
    print each table beside its SD row, and check: the paper's inversion beats the plain prompt,
    then issue 15's bar.  A bar the methods do not reach is reported as an expected failure with
    the numbers, never loosened."""
    import subprocess
    import sys

    plan = {"mushroom": ("none,init-l2", 16), "halftone": ("none,init-l2,norm,directional", 8)}
    steps, out = 2000, tmp_path / "results.json"
    argv = [sys.executable, "-m", "demo.regularize_sweep", *(f"--plan={n}={m}@{i}" for n, (m, i) in plan.items()),
            "--steps", str(steps), "--out", str(out), "--home", str(tmp_path / "home")]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0 and out.exists(), proc.stdout[-4000:] + proc.stderr[-4000:]
    results = json.loads(out.read_text())
    assert set(results) == set(plan)
    tables = {}
    for name, result in results.items():
        record = next(r for r in json.loads((SAMPLES / "concepts.json").read_text()) if r["name"] == name)
        assert result["prompts"] == record["edit_prompts"] and result["runs_trained_together"] == 6
        assert result["clip"]["name"] == "builtin:demo" and result["images"] == plan[name][1]
        tables[name] = {row["label"]: row for row in result["rows"]}
        with capsys.disabled():
            print(f"\n{name} ({record['property']}), {steps} steps, {result['images']} images per set")
            for label, r in tables[name].items():
                print(f"  {label:12} reconstruction {r['reconstruction']:.4f}  editability {r['editability']:.4f}")
    for rows in tables.values():  # the paper's inversion works
        assert rows["none"]["reconstruction"] >= rows["SD"]["reconstruction"] + 0.05, rows

    halftone = tables["halftone"]
    lost = {label: halftone["none"]["reconstruction"] - r["reconstruction"]
            for label, r in halftone.items() if label not in ("SD", "none")}
    assert max(lost.values()) <= STYLE_LOSS, lost

    mushroom = tables["mushroom"]
    sd, methods = mushroom["SD"], [r for label, r in mushroom.items() if label not in ("SD", "none")]
    kept = [r for r in methods if r["reconstruction"] >= RECON_FLOOR and r["editability"] >= sd["editability"]]
    if not kept:
        best = max(methods, key=lambda r: r["editability"])
        pytest.xfail(f"issue 15's bar not reached: no method keeps reconstruction >= {RECON_FLOOR} with "
                     f"editability >= SD's {sd['editability']:.4f}; {best['label']}: "
                     f"{best['reconstruction']:.4f} / {best['editability']:.4f} (README: Keeping a word editable)")


def test_the_demo_scripts_resume_exactly_where_they_saved(tmp_path):
    """demo.common.save_checkpoint / resume: the one resume path of train_t2i (vae, unet) and train_clip."""
    from demo.common import resume, save_checkpoint

    def fresh(seed: int):
        torch.manual_seed(seed)
        model = torch.nn.Linear(4, 2)
        return model, torch.optim.AdamW(model.parameters(), lr=0.1), np.random.default_rng(seed)

    def step(model, opt, rng):
        x = torch.from_numpy(rng.random((3, 4), dtype=np.float32)) + torch.randn(3, 4)
        model(x).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()

    path = tmp_path / "ckpt.pt"
    model, opt, rng = fresh(0)
    assert resume(path, rng, model=model, opt=opt) == 0  # nothing saved yet: start at 0, nothing touched
    step(model, opt, rng)
    save_checkpoint(path, rng, 1, model=model, opt=opt)
    step(model, opt, rng)  # the uninterrupted run's second step

    again, again_opt, again_rng = fresh(1)
    assert resume(path, again_rng, model=again, opt=again_opt) == 1
    step(again, again_opt, again_rng)
    for a, b in zip(model.parameters(), again.parameters()):
        assert torch.equal(a, b)
    assert not path.with_suffix(".tmp").exists()
