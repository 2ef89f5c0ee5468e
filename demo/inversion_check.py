"""Does an inversion on builtin:demo learn its concept?  The demo's Table 1, measured directly.

    python -m demo.inversion_check [--concept mushroom] [--steps 2000] [--lr 5e-4] [--images 16]

For each held-out concept (demo/samples): train one new word with the engine's
own inversion (engine.inversion.train, its defaults), then generate with it (SD+TI) and
with the concept's plain description (SD) straight through the pipeline (no
library, no engine server; DPM++ 20 steps, CFG 5), and score both with the
engine's metrics and the demo judge (CLIP):

* reconstruction: mean pairwise cosine between the judge's embeddings of the
  generated pictures (neutral prompt) and of the training pictures;
* editability: for each of the concept's edit prompts, the cosine between the
  mean image embedding of its pictures and the prompt's text embedding with
  the placeholder removed (the paper's definition; the original TI code's
  placeholder handling); the mean over the prompts.

Results go to demo/logs/inversion_check.json, pictures to demo/preview.png.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from demo.common import LOGS

SAMPLES = Path(__file__).parent / "samples"
PREVIEW_ROWS: dict[str, dict[str, list]] = {}


def demo_model_loaded(unet_weights=None):
    """builtin:demo as the engine loads it; unet_weights: another UNet (a checkpoint while training)."""
    from engine.sd.models import load_model

    model = load_model("builtin:demo")
    if unet_weights:
        from safetensors.torch import load_file

        model.pipe.unet.load_state_dict(load_file(str(unet_weights)))  # copied into the fp32 parameters
    return model


@torch.no_grad()
def generate(pipe, prompt: str, n: int, seed: int, steps: int = 20, guidance: float = 5.0):
    from diffusers import DPMSolverMultistepScheduler

    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++")
    gens = [torch.Generator().manual_seed(seed + i) for i in range(n)]
    return pipe([prompt] * n, num_inference_steps=steps, guidance_scale=guidance, generator=gens).images


def scores(pipe, clip, train_embs, word: str, prop: str, edits: list[str], n: int, seed: int):
    """The engine's reconstruction and (paper) editability, on pictures made with `word` for the concept."""
    from engine.inversion.metrics import editability_paper_per_prompt, reconstruction
    from engine.settings.prompts import fill, neutral_prompt, without_placeholder

    neutral = generate(pipe, fill(neutral_prompt(prop), word), n, seed)
    recon = reconstruction(clip.images(neutral), train_embs)
    edit_embs = [clip.images(generate(pipe, fill(template, word), n, seed + 1000)) for template in edits]
    per_prompt = editability_paper_per_prompt(edit_embs, clip.texts([without_placeholder(t) for t in edits]))
    return recon, float(np.mean(per_prompt)), per_prompt, neutral


def run_concept(record: dict, steps: int, n: int, seed: int, lr: float, out_dir: Path, unet_weights=None) -> dict:
    from PIL import Image

    from engine.inversion.judge import load_clip
    from engine.inversion.train import TrainConfig, train
    from engine.settings.prompts import DEMO_SPEC, edit_prompts

    model = demo_model_loaded(unet_weights)
    clip = load_clip(DEMO_SPEC)
    paths = [SAMPLES / record["name"] / name for name in record["images"]]
    train_embs = clip.images([Image.open(p) for p in paths])
    edits = edit_prompts(record["property"], DEMO_SPEC)

    token = f"<{record['name']}>"
    config = TrainConfig(token=token, init=record["init"], property=record["property"], steps=steps, lr=lr,
                         seed=seed, save_every=max(steps, 1), preview_every=0, log_every=50,
                         probe_every=0, dloss_every=0)  # it measures the word itself
    t = time.time()
    run_dir = out_dir / record["name"]
    embedding = train(model, config, run_dir, paths, resume=False)
    train_s = time.time() - t

    pipe = model.pipe
    sd = scores(pipe, clip, train_embs, record["description"], record["property"], edits, n, seed)
    pipe.load_textual_inversion(str(embedding), token=token)
    ti = scores(pipe, clip, train_embs, token, record["property"], edits, n, seed)
    edited = generate(pipe, edits[0].replace("{}", token), 8, seed + 2000)
    pipe.unload_textual_inversion(token)
    train_small = [Image.open(p).convert("RGB").resize((32, 32), Image.Resampling.NEAREST) for p in paths]
    rows = {"training": train_small, "SD": sd[3][:8], "SD+TI": ti[3][:8], "SD+TI edit": edited}
    PREVIEW_ROWS[record["name"]] = rows
    return {
        "concept": record["name"], "property": record["property"], "steps": steps, "lr": lr, "seed": seed,
        "train_seconds": round(train_s, 1), "images_per_prompt": n,
        "SD": {"reconstruction": round(sd[0], 4), "editability": round(sd[1], 4),
               "per_prompt": [round(x, 4) for x in sd[2]]},
        "SD+TI": {"reconstruction": round(ti[0], 4), "editability": round(ti[1], 4),
                  "per_prompt": [round(x, 4) for x in ti[2]]},
    }


def write_preview(path: Path, scale: int = 3) -> None:
    """Per concept, four rows of 32-px pictures: training | SD (description) | SD+TI | SD+TI, first edit."""
    from PIL import Image

    tile, cols = 32, 8
    rows = [r for concept in PREVIEW_ROWS.values() for r in concept.values()]
    gap = 4
    height = len(rows) * tile + (len(PREVIEW_ROWS) - 1) * gap
    canvas = np.full((height, cols * tile, 3), 255, np.uint8)
    y = 0
    for concept in PREVIEW_ROWS.values():
        for images in concept.values():
            for i, im in enumerate(images[:cols]):
                canvas[y : y + tile, i * tile : (i + 1) * tile] = np.asarray(im.convert("RGB"))
            y += tile
        y += gap
    Image.fromarray(canvas.repeat(scale, 0).repeat(scale, 1)).save(path, optimize=True)
    print("preview", path, "rows per concept:", list(next(iter(PREVIEW_ROWS.values())).keys()))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--concept", action="append", default=None)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--unet", default=None, help="a UNet safetensors instead of the shipped one")
    ap.add_argument("--out", default=None, help="folder for runs and grids (default: a temporary one)")
    ap.add_argument("--log", default=str(LOGS / "inversion_check.json"))
    ap.add_argument("--preview", default=str(Path(__file__).parent / "preview.png"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    records = json.loads((SAMPLES / "concepts.json").read_text())
    if args.concept:
        records = [r for r in records if r["name"] in args.concept]
    out_dir = Path(args.out or tempfile.mkdtemp(prefix="demo-inversion-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for record in records:
        result = run_concept(record, args.steps, args.images, args.seed, args.lr, out_dir, args.unet)
        print(json.dumps(result), flush=True)
        results.append(result)
    Path(args.log).write_text(json.dumps({"args": vars(args), "results": results}, indent=1) + "\n")
    write_preview(Path(args.preview))
    print("grids in", out_dir)


if __name__ == "__main__":
    main()
