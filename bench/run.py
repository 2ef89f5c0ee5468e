"""`make bench`: our training step against the diffusers example's, in one process.

On CUDA: builtin:sd15-arch (SD 1.5 shapes, random weights) at 512 px, fp16, batch 1.
On CPU:  builtin:tiny (64 px, fp32) — ratios only; absolute times count only on a GPU.

Prints steps/s, ms/step and peak memory per variant, then the ratio, and ends
with one JSON line (also saved under bench/results/<device>-<date>.json).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.reference import ReferenceLoop  # noqa: E402
from engine.gpu import frozen_dtype, pick_device  # noqa: E402
from engine.models import load_model  # noqa: E402
from engine.train import Inversion, RunSlot, TrainConfig  # noqa: E402

GIB = 2**30


def synthetic_images(count: int, size: int, folder: Path) -> tuple[list[Image.Image], list[Path]]:
    rng = np.random.RandomState(0)
    images, paths = [], []
    for i in range(count):
        pixels = (rng.rand(size, size, 3) * 255).astype("uint8")
        image = Image.fromarray(pixels)
        path = folder / f"{i}.png"
        image.save(path)
        images.append(image)
        paths.append(path)
    return images, paths


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, warmup: int, steps: int) -> dict:
    """Steps/s and peak memory of `fn` after `warmup` calls (warm-up time reported too)."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        fn()
    sync(device)
    warm = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    elapsed = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None
    return {"steps_per_s": steps / elapsed, "ms_per_step": 1000 * elapsed / steps, "peak_gib": peak,
            "warmup_s": warm}


def ours(model, paths, device, args, k: int = 1, **cfg) -> dict:
    slots = [RunSlot(TrainConfig(token=f"<b{i}>", init="cat", seed=i, steps=10**9, preview_every=0, **cfg),
                     Path(tempfile.mkdtemp()), paths) for i in range(k)]
    inv = Inversion(model, slots)
    counter = iter(range(10**9))
    with inv.installed():
        result = timed(lambda: inv.train_step(next(counter)), device, args.warmup, args.steps)
    result["run_steps_per_s"] = result["steps_per_s"] * k
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def reference(model, images, device, args) -> dict:
    loop = ReferenceLoop(model, images)
    result = timed(loop.step, device, args.warmup, args.steps)
    del loop
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def generation(model, device, args) -> dict:
    from engine.generate import sample_images

    ids = model.tokenizer(["a photo of a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    embeds = model.text_encoder(ids.to(device))[0]
    sample_images(model, embeds, seeds=[0], steps=2)  # warm
    sync(device)
    t0 = time.perf_counter()
    sample_images(model, embeds, seeds=list(range(args.gen_images)), steps=25)
    sync(device)
    elapsed = time.perf_counter() - t0
    return {"images": args.gen_images, "steps": 25, "seconds": elapsed, "images_per_s": args.gen_images / elapsed}


def table1(model, paths, device, args) -> dict:
    """Wall time of a Table-1 evaluation: 2 rows x (16 + 3 x 16) images, plus CLIP."""
    import os

    from engine.formats import write_embedding
    from engine.jobs import create_run, set_status
    from engine.library import Library
    from engine.metrics import evaluate

    home = Path(tempfile.mkdtemp())
    os.environ["TISTUDIO_HOME"] = str(home)
    library = Library(home)
    library.add("bench", paths[0].parent, "cat")
    run_dir = create_run(home, {"kind": "import", "concept": "bench", "params": {}})
    table = model.text_encoder.get_input_embeddings().weight
    write_embedding(run_dir / "learned_embeds.safetensors", table[2368:2369].float().cpu(), "<bench>")
    set_status(run_dir, "done")
    sync(device)
    t0 = time.perf_counter()
    evaluate(model, library, "bench", images=args.eval_images, clip=args.clip, batch_size=16)
    sync(device)
    return {"images_per_set": args.eval_images, "images": 2 * 4 * args.eval_images, "clip": args.clip,
            "seconds": time.perf_counter() - t0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="default: builtin:sd15-arch on CUDA, builtin:tiny on CPU")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--variants", default="auto",
                        help="comma list of: low-vram, compile, reduce-overhead, batched (auto: all on CUDA)")
    parser.add_argument("--batched", type=int, default=8, help="K for the batched variant")
    parser.add_argument("--gen-images", type=int, default=16)
    parser.add_argument("--eval-images", type=int, default=16, help="images per set in the Table-1 timing")
    parser.add_argument("--clip", default="builtin:tiny", help="CLIP for the Table-1 timing (default builtin:tiny: "
                        "no weights to download; a real ViT-B-32 adds well under a second)")
    parser.add_argument("--no-save", action="store_true", help="do not write bench/results/")
    args = parser.parse_args()

    device = pick_device()
    cuda = device.type == "cuda"
    spec = args.model or ("builtin:sd15-arch" if cuda else "builtin:tiny")
    args.steps = args.steps or (100 if cuda else 40)
    variants = args.variants.split(",") if args.variants != "auto" else (
        ["low-vram", "reduce-overhead", "batched"] if cuda else ["low-vram", "batched"])
    model = load_model(spec, device, frozen_dtype(device))
    name = torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine()
    print(f"device: {device} ({name}, {torch.get_num_threads()} threads), model {spec}, "
          f"{model.info.resolution} px, {model.dtype}, {args.steps} timed steps after {args.warmup} warm-up")

    folder = Path(tempfile.mkdtemp())
    images, paths = synthetic_images(4, model.info.resolution, folder)
    results = {"ours": ours(model, paths, device, args), "reference": reference(model, images, device, args)}
    if "low-vram" in variants:
        results["ours_low_vram"] = ours(model, paths, device, args, low_vram=True)
    for mode in ("default", "reduce-overhead"):
        key = "compile" if mode == "default" else mode
        if key in variants:
            first = ours(model, paths, device, args, compile=mode)
            second = ours(model, paths, device, args, compile=mode)  # same warm model: cached graphs
            results[f"ours_compile_{mode}"] = {**second, "first_warmup_s": first["warmup_s"],
                                               "second_warmup_s": second["warmup_s"]}
    if "batched" in variants:
        k = args.batched if cuda else min(args.batched, 4)
        results[f"ours_batched_{k}"] = ours(model, paths, device, args, k=k)
    results["generation"] = generation(model, device, args)
    results["table1_eval"] = table1(model, paths, device, args)

    for key, r in results.items():
        if "steps_per_s" in r:
            peak = f"{r['peak_gib']:.2f} GiB" if r["peak_gib"] is not None else "n/a (CPU)"
            batched = r.get("run_steps_per_s", 0) > r["steps_per_s"]
            extra = f", {r['run_steps_per_s']:.1f} run-steps/s" if batched else ""
            print(f"{key:28} {r['steps_per_s']:8.2f} steps/s {r['ms_per_step']:8.1f} ms/step  peak {peak}{extra}")
    g = results["generation"]
    print(f"{'generation':28} {g['images']} images x 25 steps in {g['seconds']:.2f} s "
          f"({g['images_per_s']:.2f} images/s)")
    e = results["table1_eval"]
    print(f"{'table-1 evaluation':28} {e['images']} images + CLIP ({e['clip']}) in {e['seconds']:.1f} s")
    speedup = results["ours"]["steps_per_s"] / results["reference"]["steps_per_s"]
    print(f"speedup (ours / reference): {speedup:.2f}x")
    summary = {
        "device": f"{device.type}:{name}", "model": spec, "resolution": model.info.resolution,
        "dtype": str(model.dtype).replace("torch.", ""), "date": dt.date.today().isoformat(),
        "ours_steps_per_s": results["ours"]["steps_per_s"],
        "reference_steps_per_s": results["reference"]["steps_per_s"], "speedup": speedup,
        "ours_peak_gib": results["ours"]["peak_gib"], "reference_peak_gib": results["reference"]["peak_gib"],
        "process_max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "variants": results,
    }
    if not args.no_save:
        out = ROOT / "bench" / "results" / f"{device.type}-{summary['date']}.json"
        out.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
