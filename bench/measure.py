"""One benchmark variant, measured in this process: bench/run.py starts one of these per variant.

    python bench/measure.py VARIANT --model SPEC --result FILE [--partial FILE] [settings]
    python bench/measure.py --probe          (versions and device, as one JSON line)

Writes FILE (one JSON object) when the variant ends; on failure prints the traceback and
exits 1.  While it runs, figures worth keeping if it is killed later (a compile's first
warm-up) go to the partial FILE.  `TISTUDIO_BENCH_FAIL=NAME[,NAME:hang]` makes a variant
raise (or hang): that is how the runner's own tests break one on purpose.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GIB = 2**30
SYNC_WARNING = "synchronizing CUDA operation"  # what torch.cuda.set_sync_debug_mode("warn") says


# --- timing helpers ---------------------------------------------------------------------------


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


def timed(fn, device, warmup: int, steps: int) -> dict:
    """Steps/s, ms/step and peak memory of `fn` over `steps` calls after `warmup` calls."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        fn()
    sync(device)
    warm = time.perf_counter() - t0
    reset_peak(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    elapsed = time.perf_counter() - t0
    return {"steps_per_s": steps / elapsed, "ms_per_step": 1000 * elapsed / steps, "peak_gib": peak_gib(device),
            "warmup_s": warm, "steps": steps, "warmup_steps": warmup}


def count_syncs(step, steps: int, set_mode=None) -> dict:
    """Host synchronisations per call of `step`, counted from CUDA's sync debug warnings.

    Each synchronising operation (a .item(), a blocking copy, a boolean mask) warns once
    per occurrence; the Python line that triggered it is kept, so the worst sites show.
    """
    import torch

    set_mode = set_mode or torch.cuda.set_sync_debug_mode
    set_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(steps):
                step()
    finally:
        set_mode("default")
    syncs = [w for w in caught if SYNC_WARNING in str(w.message)]
    sites = Counter(f"{Path(w.filename).name}:{w.lineno}" for w in syncs)
    return {"syncs_per_step": len(syncs) / steps, "sync_sites": dict(sites.most_common(10)), "counted_steps": steps}


# --- what a variant works on -----------------------------------------------------------------


class Bench:
    """The device, the model and the settings one variant measures with."""

    def __init__(self, args, model=None):
        self.args = args
        t0 = time.perf_counter()  # diffusers' and transformers' imports included
        self.model = model or load(args.model)
        self.load_s = time.perf_counter() - t0
        self.device = self.model.device
        self.folder = Path(tempfile.mkdtemp(prefix="tistudio-bench-"))
        self.images, self.paths = synthetic_images(4, self.model.info.resolution, self.folder / "images")
        self._partial: dict = {}

    def partial(self, **figures) -> None:
        """Keep figures that should survive if this process is killed later."""
        self._partial.update(figures)
        write_partial(self.args.partial, self._partial)


def load(spec: str):
    """The model a variant measures: on the device this machine offers, frozen weights in its dtype."""
    from engine.devices.runtime import frozen_dtype, pick_device
    from engine.sd.models import load_model

    device = pick_device()
    return load_model(spec, device, frozen_dtype(device))


def write_partial(path: str | None, figures: dict) -> None:
    if path:
        tmp = Path(path + ".tmp")
        tmp.write_text(json.dumps(figures))
        tmp.replace(path)


def synthetic_images(count: int, size: int, folder: Path):
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(0)
    images, paths = [], []
    for i in range(count):
        image = Image.fromarray((rng.rand(size, size, 3) * 255).astype("uint8"))
        image.save(folder / f"{i}.png")
        images.append(image)
        paths.append(folder / f"{i}.png")
    return images, paths


def inversion(b: Bench, k: int = 1, **cfg):
    from engine.inversion.train import Inversion, RunSlot, TrainConfig

    slots = [RunSlot(TrainConfig(token=f"<b{i}>", init="cat", seed=i, steps=10**9, preview_every=0, **cfg),
                     Path(tempfile.mkdtemp(dir=b.folder)), b.paths) for i in range(k)]
    return Inversion(b.model, slots)


# --- the measures (bench/variants.py names them) ---------------------------------------------


def train_step(b: Bench, k: int = 1, **cfg) -> dict:
    """Our training step (K runs sharing it), as Inversion.run takes it."""
    inv = inversion(b, k, **cfg)
    counter = iter(range(10**9))
    with inv.installed():
        result = timed(lambda: inv.train_step(next(counter)), b.device, b.args.warmup, b.args.steps)
    return {**result, "runs": k, "run_steps_per_s": result["steps_per_s"] * k, **cfg}


def reference_loop(model, images):
    """The diffusers example our step is measured against: textual_inversion(_sdxl).py's, by family."""
    if model.info.family == "sdxl":
        from bench.reference_sdxl import ReferenceLoopSDXL

        return ReferenceLoopSDXL(model, images)
    from bench.reference import ReferenceLoop

    return ReferenceLoop(model, images)


def reference(b: Bench) -> dict:
    return timed(reference_loop(b.model, b.images).step, b.device, b.args.warmup, b.args.steps)


def syncs(b: Bench) -> dict:
    """Host synchronisations per training step: ours, then the reference (CUDA only)."""
    if b.device.type != "cuda":
        return {"ours_syncs_per_step": None, "reference_syncs_per_step": None,
                "note": "counted on CUDA only (torch.cuda.set_sync_debug_mode)"}
    steps = max(1, min(b.args.steps, 20))
    ours, ref = _our_syncs(b, steps), _reference_syncs(b, steps)
    return {"ours_syncs_per_step": ours["syncs_per_step"], "ours_sync_sites": ours["sync_sites"],
            "reference_syncs_per_step": ref["syncs_per_step"], "reference_sync_sites": ref["sync_sites"],
            "counted_steps": steps}


def _our_syncs(b: Bench, steps: int) -> dict:
    inv = inversion(b)
    counter = iter(range(10**9))
    with inv.installed():
        for _ in range(b.args.warmup):  # first steps may sync for one-off set-up
            inv.train_step(next(counter))
        sync(b.device)
        return count_syncs(lambda: inv.train_step(next(counter)), steps)


def _reference_syncs(b: Bench, steps: int) -> dict:
    loop = reference_loop(b.model, b.images)
    for _ in range(b.args.warmup):
        loop.step()
    sync(b.device)
    return count_syncs(loop.step, steps)


def sync_error(b: Bench) -> dict:
    """One training step of ours under CUDA's sync debug mode "error": any host sync raises, naming
    itself (ok: none did).  A CPU has no syncs to catch: it reports the step's host-to-device
    uploads instead (one, issue 23 item 5), counted through Inversion._upload."""
    import torch

    inv = inversion(b)
    counter = iter(range(10**9))
    uploads = []
    upload = inv._upload
    inv._upload = lambda host: uploads.append(host.numel()) or upload(host)
    with inv.installed():
        for _ in range(max(1, b.args.warmup)):  # the first steps may sync for one-off set-up
            inv.train_step(next(counter))
        sync(b.device)
        uploads.clear()
        if b.device.type != "cuda":
            inv.train_step(next(counter))
            return {"ok": None, "uploads_per_step": len(uploads), "upload_floats": sum(uploads),
                    "note": "sync debug mode is CUDA's; on a CPU, the step's host-to-device uploads"}
        torch.cuda.set_sync_debug_mode("error")
        try:
            inv.train_step(next(counter))
            error = None
        except RuntimeError as exc:  # the synchronising call, with its traceback in the log
            error = " ".join(str(exc).split())[:300]
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return {"ok": error is None, "error_in_step": error, "uploads_per_step": len(uploads),
            "upload_floats": sum(uploads)}


def engine_fork(b: Bench) -> dict:
    """Warm workers on a GPU (issue 24): one real train job through the engine on this device, its
    worker killed with kill -9 mid-run, then a second job, whose worker the zygote forks (it imported
    torch before anything touched CUDA); then the first resumed.  Records whether the fork was used
    and how each job ended (interrupted, done, done).  A CPU has no CUDA to be careful of: there the
    same is tested by tests/test_zygote.py, and the variant says so without running an engine."""
    if b.device.type != "cuda":
        return {"ok": None, "note": "a CUDA check; on a CPU the zygote's forks are tests/test_zygote.py's"}
    import asyncio
    import os
    import signal

    home = Path(tempfile.mkdtemp(prefix="tis-fork-"))  # short: the engine's socket path must fit
    os.environ.update(TISTUDIO_HOME=str(home), TISTUDIO_DEVICES=str(b.device), TISTUDIO_ENGINE_IDLE="60",
                      TISTUDIO_ENGINE_OWNER=str(os.getpid()))
    from engine.store.library import Library
    from engine.wire.client import EngineClient

    Library(home).add("bench", b.folder / "images", "cat")
    params = {"model": b.args.model, "steps": 400, "save_every": 100, "preview_every": 0, "log_every": 10}
    if _knows("probe_every"):
        params["probe_every"] = 0  # the fork is what is measured here, not the probes

    async def run() -> dict:
        client = await EngineClient(home).connect()
        try:
            first = await client.submit("train", concept="bench", params=params)
            async for event in client.events(first):  # the first worker is running its job
                if event.get("type") == "step" and event.get("step", 0) >= 20:
                    break
            status = await client.status()
            killed = next(w["pid"] for w in status["workers"] if w.get("job") == first)
            os.kill(killed, signal.SIGKILL)
            first_status = await client.wait(first)
            second = await client.submit("train", concept="bench", params={**params, "steps": 20})
            second_status = await client.wait(second)
            status = await client.status()
            fork = status["backend"].get("fork") or {}
            worker = next((w["pid"] for w in status["workers"] if w.get("pid")), None)
            resumed = await client.submit(resume=first)
            resumed_status = await client.wait(resumed)
            return {"fork": fork, "killed_worker": killed, "second_worker": worker,
                    "second_worker_parent": _parent(worker), "first": first_status, "second": second_status,
                    "first_resumed": resumed_status}
        finally:
            await client.stop(force=True)
            await client.close()

    found = asyncio.run(run())
    forked = bool(found["fork"].get("zygote")) and found["second_worker_parent"] == found["fork"]["zygote"]
    ok = forked and (found["first"], found["second"], found["first_resumed"]) == ("interrupted", "done", "done")
    return {"ok": ok, "forked": forked, **found}


def _knows(setting: str) -> bool:
    """Whether this engine's TrainConfig has `setting` (the bench runs against older engines too)."""
    from dataclasses import fields

    from engine.settings.train import TrainConfig

    return setting in {f.name for f in fields(TrainConfig)}


def _parent(pid: int | None) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]) if pid else None
    except (OSError, ValueError, IndexError):
        return None


def resume_fp16(b: Bench) -> dict:
    """Two resumes (issue 23 items 6 and 13).  A run begun in fp32 and resumed in fp16: the loss
    scale it trains with afterwards (2**16: scaling on).  A run cut and resumed in the model's
    own dtype against the uninterrupted run: without --deterministic within
    engine.devices.determinism.CUDA_TOLERANCE on CUDA (equal on a CPU), with it equal."""
    import torch

    fp32, fp16 = _with_dtype(b.model, torch.float32), _with_dtype(b.model, torch.float16)
    scale = _scale_after_resume(b, fp32, fp16)
    del fp32, fp16
    steps = max(2, min(b.args.steps, 6))  # a few steps on each side of the cut (--steps 2: one)
    plain = _resume_against_uninterrupted(b, False, steps)
    try:
        exact = _resume_against_uninterrupted(b, True, steps)
    except RuntimeError as exc:  # an op with no deterministic kernel names itself
        exact = {"error": " ".join(str(exc).split())[:300]}
    return {**scale, "resume": plain, "resume_deterministic": exact}


def _with_dtype(model, dtype):
    """`model` with its weights in `dtype`: itself, or a copy (the bench's own model stays as it is)."""
    import copy
    import dataclasses

    if model.dtype == dtype:
        return model
    return dataclasses.replace(model, pipe=copy.deepcopy(model.pipe).to(dtype=dtype), dtype=dtype)


def _bench_run(b: Bench, model, run_dir: Path, steps: int, **cfg):
    """Train (or resume) one run of ours to `steps`; returns its reporter's events and final vector."""
    from engine.inversion.train import QuietReporter, TrainConfig, train
    from engine.sd.formats import read_embedding

    reporter = QuietReporter()
    config = TrainConfig(token="<b>", init="cat", seed=1, steps=steps, save_every=1, log_every=1,
                         preview_every=0, **cfg)
    final = train(model, config, run_dir, b.paths, reporter)
    return reporter.events, read_embedding(final).vectors


def _scale_after_resume(b: Bench, fp32, fp16) -> dict:
    run_dir = Path(tempfile.mkdtemp(dir=b.folder))
    _bench_run(b, fp32, run_dir, steps=1)
    events, _ = _bench_run(b, fp16, run_dir, steps=2)
    step = [e for e in events if e["type"] == "step"][-1]
    return {"started_in": "fp32", "resumed_in": "fp16", "loss_scale_after_resume": step["loss_scale"],
            "skipped_after_resume": step["skipped"], "loss_after_resume": step["loss"]}


def _resume_against_uninterrupted(b: Bench, deterministic: bool, steps: int) -> dict:
    import torch

    from engine.devices.determinism import CUDA_TOLERANCE

    whole, cut = Path(tempfile.mkdtemp(dir=b.folder)), Path(tempfile.mkdtemp(dir=b.folder))
    _, uninterrupted = _bench_run(b, b.model, whole, steps, deterministic=deterministic)
    _bench_run(b, b.model, cut, steps // 2, deterministic=deterministic)
    _, resumed = _bench_run(b, b.model, cut, steps, deterministic=deterministic)
    within = torch.allclose(resumed, uninterrupted, **CUDA_TOLERANCE)
    return {"equal": bool(torch.equal(resumed, uninterrupted)), "within_tolerance": bool(within),
            "max_abs_diff": float((resumed - uninterrupted).abs().max()), "tolerance": CUDA_TOLERANCE,
            "steps": steps, "cut_at": steps // 2}


def generation(b: Bench) -> dict:
    from engine.sd.generation import sample_prompt

    model, device, n, steps = b.model, b.device, b.args.gen_images, b.args.sample_steps
    tokenizers = [tok for _, tok in model.encoders]  # any family: the pipeline encodes the prompt
    sample_prompt(model, "a photo of a cat", tokenizers, seeds=[0], steps=2)  # warm
    sync(device)
    reset_peak(device)
    t0 = time.perf_counter()
    sample_prompt(model, "a photo of a cat", tokenizers, seeds=list(range(n)), steps=steps)
    sync(device)
    elapsed = time.perf_counter() - t0
    return {"images": n, "sample_steps": steps, "seconds": elapsed, "images_per_s": n / elapsed,
            "peak_gib": peak_gib(device)}


def table1(b: Bench) -> dict:
    """Wall time of a Table-1 evaluation: 2 rows x (1 + 3 edit prompts) sets of images, plus CLIP."""
    from engine.inversion.metrics import evaluate
    from engine.sd.formats import write_embedding
    from engine.store.library import Library
    from engine.store.runs import create_run, set_status

    home = b.folder / "home"
    os.environ["TISTUDIO_HOME"] = str(home)
    library = Library(home)
    library.add("bench", b.paths[0].parent, "cat")
    run_dir = create_run(home, {"kind": "import", "concept": "bench", "params": {}})
    table = b.model.text_encoder.get_input_embeddings().weight
    write_embedding(run_dir / "learned_embeds.safetensors", table[2368:2369].float().cpu(), "<bench>")
    set_status(run_dir, "done")
    clip, weights = b.args.clip, None
    if clip.startswith("random:"):  # the architecture with random weights: the timing is the same
        clip = clip.removeprefix("random:")
        weights = random_clip_weights(clip, b.folder / "clip.safetensors")
    sync(b.device)
    reset_peak(b.device)
    t0 = time.perf_counter()
    result = evaluate(b.model, library, "bench", images=b.args.eval_images, clip=clip, clip_weights=weights,
                      sample_steps=b.args.sample_steps, batch_size=16)
    sync(b.device)
    sets = 2 * (1 + len(result["prompts"]))
    return {"seconds": time.perf_counter() - t0, "images_per_set": b.args.eval_images, "sets": sets,
            "images": sets * b.args.eval_images, "sample_steps": b.args.sample_steps, "clip": b.args.clip,
            "peak_gib": peak_gib(b.device)}


def watched(b: Bench, steps: int = 2000) -> dict:
    """Ours with probes and the deterministic loss at their defaults (issue 25): a training step, one
    deterministic loss and one probe (its images, then the judge built, used and freed) each timed
    on their own, and the steps/s of a default `steps`-step run projected from them: the loss every
    25 steps (and at the start), a probe every 500 and the SD row once.  The probe's judge is
    --clip (random:ARCH: the architecture with random weights)."""
    from engine.inversion.judge import prepare_judge
    from engine.inversion.probes import DeterministicLoss, Prober
    from engine.inversion.train import TrainConfig

    default = TrainConfig.__dataclass_fields__["probe_steps"].default
    inv = inversion(b, probe_steps=min(b.args.sample_steps, default))  # the default; fewer when told (tests)
    cfg = inv.cfg0
    clip, weights = b.args.clip, None
    if clip.startswith("random:"):
        clip = clip.removeprefix("random:")
        weights = random_clip_weights(clip, b.folder / "clip.safetensors")
    counter = iter(range(10**9))
    with inv.installed():
        step = timed(lambda: inv.train_step(next(counter)), b.device, b.args.warmup, b.args.steps)
        dloss = timed(DeterministicLoss(inv).values, b.device, 1, max(2, min(b.args.steps, 10)))
        prober = Prober(inv, prepare_judge(clip, weights))
        prober.probe([0], None)  # the SD row: warms the sampler up (and is the start's one-off cost)
        sync(b.device)
        t0 = time.perf_counter()
        prober.probe([0], 1)
        sync(b.device)
        probe_s = time.perf_counter() - t0
    parts = {"train": steps * step["ms_per_step"] / 1000,
             "dloss": (steps // cfg.dloss_every + 1) * dloss["ms_per_step"] / 1000,
             "probes": (steps // cfg.probe_every + 1) * probe_s}
    total = sum(parts.values())
    return {"steps_per_s": steps / total, "ms_per_step": 1000 * total / steps, "runs": 1, "projected_steps": steps,
            "train_steps_per_s": step["steps_per_s"], "dloss_ms": dloss["ms_per_step"], "probe_s": probe_s,
            "probe_images": cfg.probe_images + cfg.probe_edit_images * (len(prober.prompts(0)) - 1),
            "sample_steps": cfg.probe_steps, "clip": b.args.clip, "dloss_every": cfg.dloss_every,
            "probe_every": cfg.probe_every, "share": {k: v / total for k, v in parts.items()},
            "peak_gib": peak_gib(b.device)}


def random_clip_weights(name: str, path: Path) -> Path:
    """An open_clip checkpoint of architecture `name` with random weights (nothing downloaded)."""
    import open_clip
    from safetensors.torch import save_file

    model = open_clip.create_model(name, pretrained=None)
    save_file({k: v.detach().half().contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def compiled(b: Bench, mode: str) -> dict:
    """torch.compile'd steps: the first warm-up compiles; a second run on the warm model reuses it.
    Memory reserved before, while the warm model holds the compiled UNet after its runs, and
    once it is released (engine/inversion/compiled.py: its CUDA graphs' pool must go with it)."""
    from engine.inversion.compiled import release_compiled

    before = reserved_gib(b.device)
    first = train_step(b, compile=mode)
    b.partial(first_warmup_s=first["warmup_s"], first_steps_per_s=first["steps_per_s"])
    second = train_step(b, compile=mode)
    held = reserved_gib(b.device)
    release_compiled(b.model)
    disabled = os.environ.get("TORCH_COMPILE_DISABLE", "") not in ("", "0")
    return {**second, "first_warmup_s": first["warmup_s"], "second_warmup_s": second["warmup_s"],
            "compile_disabled_by_env": disabled, "reserved_before_gib": before, "reserved_held_gib": held,
            "reserved_released_gib": reserved_gib(b.device)}


def reserved_gib(device) -> float | None:
    """What torch's allocator keeps on the device once garbage and its free cache are gone."""
    import gc

    import torch

    if device.type != "cuda":
        return None
    gc.collect()
    torch.cuda.empty_cache()
    return torch.cuda.memory_reserved(device) / GIB


def sdxl_decode_error(b: Bench) -> dict:
    """An OOM injected into the VAE decode of an fp16 SDXL model (diffusers has upcast the VAE to
    fp32 by then), then a second generation (issue 23 item 3): the VAE must be fp16 again and the
    second must work.  On a CPU the model is fp32: an fp16 copy of it is used, at 32 px."""
    import copy
    import dataclasses

    import torch

    from engine.sd.generation import render

    model = b.model
    if model.dtype != torch.float16:
        model = dataclasses.replace(model, pipe=copy.deepcopy(model.pipe).to(dtype=torch.float16),
                                    dtype=torch.float16)
    vae, seen = model.vae, []

    def failing(*args, **kwargs):
        seen.append(str(vae.dtype))
        del vae.decode  # the class's own decode again, for the second generation
        raise torch.OutOfMemoryError("injected: out of memory during the VAE decode (bench sdxl-decode-error)")

    generate = lambda: render(model, "a photo of a cat", [0], steps=2, resolution=32, output_type="np")  # noqa: E731
    vae.decode = failing
    try:
        generate()
        first = "no error"
    except torch.OutOfMemoryError as exc:
        first = str(exc)
    after = sorted({str(p.dtype) for p in vae.parameters()})
    try:
        second_ok, second_error = len(generate()) == 1, None
    except Exception as exc:  # noqa: BLE001 - the figure to report is what went wrong
        second_ok, second_error = False, f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
    print(f"sdxl-decode-error: VAE {after} after the error; second generation "
          f"{'worked' if second_ok else 'failed: ' + str(second_error)}", flush=True)
    return {"first_error": first, "vae_dtype_in_failed_decode": seen[0] if seen else None,
            "vae_dtype_after": after, "vae_back_in_fp16": after == ["torch.float16"],
            "second_ok": second_ok, "second_error": second_error}


def sdxl_vae_memory(b: Bench) -> dict:
    """Peak memory of SDXL's VAE encoding the latent cache and decoding a batch with engine.sd.vae's
    sizes (issue 23 item 4), beside its estimate: per image, with the plan for the memory free now,
    and with the plan for a 24 GB card (its free memory simulated: 24 GiB less the context and
    what the model holds).  On a CPU: the sizes only (nothing limits them there)."""
    import dataclasses

    import torch

    from engine.inversion.data import encode_images
    from engine.sd.generation import default_batch
    from engine.sd.vae import activation_bytes, plan_for, plan_vae, working_dtype

    model, device, size = b.model, b.device, b.model.info.resolution
    batch = default_batch(size, size)
    dtype_bytes = working_dtype(model.vae).itemsize
    now = plan_for(model, size, size, batch)
    encode, decode = activation_bytes(size, size, dtype_bytes)
    result = {"resolution": size, "vae_dtype": str(working_dtype(model.vae)).replace("torch.", ""),
              "estimate_per_image_gib": {"encode": encode / GIB, "decode": decode / GIB}, "plan": now.describe()}
    if device.type != "cuda":
        return {**result, "ran": _vae_peaks(b, now, encode_images),  # the code path, at the model's own size
                "note": "sizes only on a CPU: no free-memory limit"}
    one = dataclasses.replace(plan_vae(size, size, dtype_bytes, None, 1), encode_chunk=1)  # one image at a time
    single = _vae_peaks(b, one, encode_images)
    card = 24 * GIB - int(0.5 * GIB) - torch.cuda.memory_allocated(device)  # the CUDA context: ~0.5 GiB
    small = plan_vae(size, size, dtype_bytes, card, batch)
    on_card = _vae_peaks(b, small, encode_images)
    return {**result,
            "measured_per_image_gib": {"encode": single["encode_gib"], "decode": single["decode_gib"]},
            "measured_over_estimate": {"encode": single["encode_gib"] * GIB / encode,
                                       "decode": single["decode_gib"] * GIB / decode},
            "with_plan_now": _vae_peaks(b, now, encode_images),
            "card_24gb": {"plan": small.describe(), **on_card,
                          "fits": on_card["peak_total_gib"] <= (24 * GIB - 0.5 * GIB) / GIB}}


def _vae_peaks(b: Bench, plan, encode_images) -> dict:
    """Encode 2 x len(images) images (the latent cache: each and its mirror) in the plan's chunks,
    then decode a batch as the SDXL pipeline does (upcast, slicing and tiling as planned):
    the activations' peaks over what was allocated before, and the process's peak."""
    import torch

    from engine.sd.vae import vae_kept, working_dtype

    vae, device, size = b.model.vae, b.device, b.model.info.resolution
    sync(device)
    reset_peak(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    encode_images(vae, b.images, size, plan=plan)
    sync(device)
    encode_peak = peak_gib(device)
    reset_peak(device)
    with torch.no_grad(), vae_kept(vae, plan):
        vae.to(working_dtype(vae))
        latents = torch.randn(plan.batch, vae.config.latent_channels, size // 8, size // 8, device=vae.device,
                              dtype=vae.dtype)
        vae.decode(latents)
    sync(device)
    decode_peak = peak_gib(device)
    found = {"encoded_images": 2 * len(b.images), "encode_chunk": plan.encode_chunk, "decoded_images": plan.batch,
             "decode_batch": plan.decode_batch, "slicing": plan.slicing, "tiling": plan.tiling}
    if device.type != "cuda":
        return found
    return {**found, "encode_gib": encode_peak - base / GIB, "decode_gib": decode_peak - base / GIB,
            "peak_total_gib": max(encode_peak, decode_peak),
            "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / GIB}


MEASURES = {f.__name__: f for f in (train_step, reference, syncs, sync_error, resume_fp16, generation, table1,
                                    watched, compiled, sdxl_decode_error, sdxl_vae_memory, engine_fork)}


# --- the process -------------------------------------------------------------------------------


def versions() -> dict:
    """Python, torch and the libraries' versions, and where each was imported from."""
    from importlib import import_module

    found = {"python": platform.python_version()}
    for name in ("torch", "transformers", "diffusers", "open_clip", "huggingface_hub", "safetensors"):
        try:
            module = import_module(name)
            found[name] = getattr(module, "__version__", "?")
            found[f"{name}_from"] = str(Path(module.__file__).parent)
        except Exception as exc:  # noqa: BLE001 - a missing wheel shows here, before any variant runs
            found[name] = None
            found[f"{name}_error"] = f"{type(exc).__name__}: {exc}"
    return found


def probe() -> dict:
    import torch

    cuda = torch.cuda.is_available()
    return {**versions(), "cuda": cuda, "cuda_version": torch.version.cuda,
            "device_name": torch.cuda.get_device_name(0) if cuda else (platform.processor() or platform.machine()),
            "threads": torch.get_num_threads()}


def injected_failure(args) -> None:
    """Raise (or hang) at once when TISTUDIO_BENCH_FAIL names this variant: the runner's tests."""
    for entry in filter(None, os.environ.get("TISTUDIO_BENCH_FAIL", "").split(",")):
        target, _, how = entry.partition(":")
        if target != args.variant:
            continue
        if how == "hang":
            write_partial(args.partial, {"injected": "hang"})
            while True:
                time.sleep(60)
        raise RuntimeError(f"failure injected into variant {args.variant} (TISTUDIO_BENCH_FAIL)")


def measure(args, model=None) -> dict:
    """One variant's figures: the child's whole work.  Given a loaded `model` (on the device and
    dtype the child would pick), it measures with that one instead of loading its own."""
    from bench.variants import BY_NAME

    variant = BY_NAME[args.variant]
    injected_failure(args)
    import torch

    b = Bench(args, model=model)
    result = MEASURES[variant.measure](b, **variant.params)
    return {"model": args.model, "resolution": b.model.info.resolution,
            "dtype": str(b.model.dtype).replace("torch.", ""), "model_load_s": b.load_s, **result,
            "process_max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "threads": torch.get_num_threads()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variant", nargs="?")
    parser.add_argument("--probe", action="store_true")
    parser.add_argument("--model")
    parser.add_argument("--result")
    parser.add_argument("--partial")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--gen-images", type=int, default=16)
    parser.add_argument("--eval-images", type=int, default=16)
    parser.add_argument("--sample-steps", type=int, default=25)
    parser.add_argument("--clip", default="builtin:tiny")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from engine.devices.determinism import prepare_process

    prepare_process()  # as a worker does before any CUDA call: cuBLAS as production runs it
    args = parse_args(argv)
    if args.probe:
        print(json.dumps(probe()))
        return 0
    result = measure(args)
    Path(args.result).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
