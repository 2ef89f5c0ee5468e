"""Train the demo's text-to-image model: a tiny VAE, then a UNet on its latents.

    python -m demo.train_t2i vae        # AutoencoderKL 32x32x3 <-> 16x16x4 (reconstruction + tiny KL)
    python -m demo.train_t2i unet       # UNet2DConditionModel, epsilon loss, SD's DDPM schedule, EMA
    python -m demo.train_t2i check      # the generation check: the judge names shape and colour

Both stages resume from their checkpoints in the build folder
($TISTUDIO_DEMO_BUILD, default /tmp/tistudio-demo-build) and write fp16
safetensors to engine/sd/demo_weights/ plus loss curves to demo/logs/.  The UNet
is conditioned on the frozen text tower of the demo CLIP (trained first, by
demo/train_clip.py), through transformers' CLIPTextModel exactly as the
pipeline runs it, on the generator's captions (toys and styles never named),
with 10% of captions dropped for classifier-free guidance.

The UNet's thread count can be changed while it runs: write a number to
<build>/unet_threads.
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from demo import world as W
from demo.common import BUILD, LOGS, Log, resume, roundtrip, save_checkpoint, save_fp16, to_tensor
from engine.sd import demo_model

POOL_SEED = 2  # the generator's training pictures (the judge's are seed 1, evaluations seed 99+)
CHECK_SEED = 123


def _render_pool(n: int, seed: int, p_roundtrip: float = 0.2):
    t = time.time()
    scenes = W.scenes(seed, n)
    images = W.render_batch(scenes)
    rng = np.random.default_rng(seed + 1)
    rt = np.flatnonzero(rng.random(n) < p_roundtrip)
    for chunk in np.array_split(rt, max(1, len(rt) // 1000)):
        images[chunk] = roundtrip(images[chunk])
    print(f"rendered {n} pictures in {time.time() - t:.0f}s", flush=True)
    return scenes, images


# --- stage 1: the VAE ---------------------------------------------------------------------------


def train_vae(args) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    build = Path(args.build)
    build.mkdir(parents=True, exist_ok=True)
    ckpt_path = build / "vae_ckpt.pt"
    vae = demo_model.build_vae()
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0)
    rng = np.random.default_rng(args.seed)
    log = Log(LOGS / "vae.json", {"script": "demo/train_t2i.py vae", "args": vars(args), "pool_seed": POOL_SEED,
                                  "params": sum(p.numel() for p in vae.parameters())})
    start = resume(ckpt_path, rng, model=vae, opt=opt)
    _, pool = _render_pool(args.pool, POOL_SEED)
    t_log, acc, kl_acc, n_acc = time.time(), 0.0, 0.0, 0
    for step in range(start, args.steps):
        lr = args.lr * min(1.0, (step + 1) / 100) * (0.5 * (1 + math.cos(math.pi * step / args.steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        x = to_tensor(pool[rng.integers(0, len(pool), args.batch)])
        dist = vae.encode(x).latent_dist
        rec = vae.decode(dist.sample()).sample
        mse = F.mse_loss(rec, x)
        kl = dist.kl().mean()
        loss = mse + 0.5 * F.l1_loss(rec, x) + args.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        acc += mse.item()
        kl_acc += kl.item()
        n_acc += 1
        done = step + 1
        if done % 25 == 0:
            rate = n_acc / (time.time() - t_log)
            log.loss(done, acc / n_acc, kl=round(kl_acc / n_acc, 2), steps_per_s=round(rate, 3))
            print(f"vae step {done} mse {acc / n_acc:.5f} kl {kl_acc / n_acc:.1f} {rate:.2f} it/s", flush=True)
            t_log, acc, kl_acc, n_acc = time.time(), 0.0, 0.0, 0
        if done % 250 == 0 or done == args.steps:
            save_checkpoint(ckpt_path, rng, done, model=vae, opt=opt)
            log.save()
    vae.eval()
    report = vae_report(vae)
    log.eval(args.steps, **report)
    save_fp16(vae.state_dict(), demo_model.VAE_WEIGHTS, {"steps": args.steps, "seed": args.seed})
    log.save(finished=True)
    print("vae done", report, flush=True)


@torch.no_grad()
def vae_report(vae, n: int = 512) -> dict:
    """Reconstruction error on fresh pictures, and the latents' spread (for the scaling factor)."""
    scenes = W.scenes(99, n)
    x = to_tensor(W.render_batch(scenes))
    dist = vae.encode(x).latent_dist
    rec = vae.decode(dist.mean).sample.clamp(-1, 1)
    err = (rec - x).abs().mul(127.5)
    return {
        "mae_levels": round(float(err.mean()), 3),  # mean absolute error in 0..255 levels
        "p99_levels": round(float(err.flatten().quantile(0.99)), 2),
        "latent_std": round(float(dist.mean.std()), 4),
        "latent_mean": round(float(dist.mean.mean()), 4),
        "posterior_std_mean": round(float(dist.std.mean()), 5),
    }


# --- stage 2: the UNet --------------------------------------------------------------------------


@torch.no_grad()
def encode_pool(vae, images: np.ndarray, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior (mean, std) of every picture; training draws a fresh sample each time, as SD's does."""
    means, stds = [], []
    for i in range(0, len(images), batch):
        dist = vae.encode(to_tensor(images[i : i + batch])).latent_dist
        means.append(dist.mean)
        stds.append(dist.std.half())
    return torch.cat(means), torch.cat(stds)


def _threads(build: Path, default: int) -> int:
    try:
        return max(1, int((build / "unet_threads").read_text().strip()))
    except (OSError, ValueError):
        return default


def train_unet(args) -> None:
    from safetensors.torch import load_file

    from engine.sd.tokenizer import load_clip_tokenizer

    torch.set_num_threads(_threads(Path(args.build), args.threads))
    torch.manual_seed(args.seed)
    build = Path(args.build)
    build.mkdir(parents=True, exist_ok=True)
    ckpt_path = build / "unet_ckpt.pt"

    text_state = {k: v.float() for k, v in load_file(args.text_tower).items()}
    text_encoder = demo_model.build_text_encoder(text_state).requires_grad_(False)
    tokenizer = load_clip_tokenizer()
    vae = demo_model.build_vae({k: v.float() for k, v in load_file(str(demo_model.VAE_WEIGHTS)).items()})
    scheduler = demo_model.build_scheduler()
    unet = demo_model.build_unet()
    unet.train()
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.01)
    rng = np.random.default_rng(args.seed)
    log = Log(LOGS / "unet.json", {"script": "demo/train_t2i.py unet", "args": vars(args), "pool_seed": POOL_SEED,
                                   "params": sum(p.numel() for p in unet.parameters())})
    start = resume(ckpt_path, rng, model=unet, ema=ema, opt=opt)

    latents_path = build / f"latents_{args.pool}.pt"
    scenes, pool = _render_pool(args.pool, POOL_SEED)
    if latents_path.exists():
        latents, latent_stds = torch.load(latents_path)
    else:
        t = time.time()
        latents, latent_stds = encode_pool(vae, pool)
        torch.save((latents, latent_stds), latents_path)
        print(f"encoded the pool in {time.time() - t:.0f}s", flush=True)
    del pool
    scale = 1.0 / float(latents.std())
    print(f"latent std {1 / scale:.4f} -> scaling factor {scale:.4f}", flush=True)
    log.save(scaling_factor=scale)
    _write_scaling_factor(scale)
    alphas = scheduler.alphas_cumprod
    weights = np.array([(2.0 if s.toy else 1.0) * (2.0 if s.style else 1.0) for s in scenes])
    weights /= weights.sum()

    t_log, acc, n_acc = time.time(), 0.0, 0
    for step in range(start, args.steps):
        if step % 100 == 0:
            torch.set_num_threads(_threads(build, args.threads))
        lr = args.lr * min(1.0, (step + 1) / args.warmup)
        if step > args.steps * 0.8:  # linear cool-down over the last 20%
            lr *= max(0.1, (args.steps - step) / (args.steps * 0.2))
        for g in opt.param_groups:
            g["lr"] = lr
        late = step >= args.v2_from
        if late:  # toys and paintings twice as often (each kind is rare: 3-5% of the pool)
            idx = rng.choice(len(latents), args.batch, p=weights)
        else:
            idx = rng.integers(0, len(latents), args.batch)
        variety = 3 if step >= args.v3_from else 2 if late else 1
        caps = ["" if rng.random() < args.drop else W.caption(scenes[i], rng, variety=variety) for i in idx]
        ids = tokenizer(caps, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            hidden = text_encoder(ids)[0]
        x0 = (latents[idx] + latent_stds[idx].float() * torch.randn_like(latents[idx])) * scale
        noise = torch.randn_like(x0)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (args.batch,))
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        pred = unet(noisy, t, encoder_hidden_states=hidden).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - decay)
        acc += loss.item()
        n_acc += 1
        done = step + 1
        if done % 25 == 0:
            rate = n_acc / (time.time() - t_log)
            log.loss(done, acc / n_acc, lr=round(lr, 7), steps_per_s=round(rate, 3), threads=torch.get_num_threads())
            print(f"unet step {done} loss {acc / n_acc:.4f} {rate:.2f} it/s", flush=True)
            t_log, acc, n_acc = time.time(), 0.0, 0
        if done % args.save_every == 0 or done == args.steps:
            save_checkpoint(ckpt_path, rng, done, model=unet, ema=ema, opt=opt)
            save_fp16(ema.state_dict(), build / "unet_ema.safetensors", {"steps": done})
            log.save()
    save_fp16(ema.state_dict(), demo_model.UNET_WEIGHTS, {"steps": args.steps, "seed": args.seed, "ema": args.ema})
    log.save(finished=True)
    print("unet done", flush=True)


def _write_scaling_factor(scale: float) -> None:
    """The pipeline reads the latents' scale from the VAE config, as SD's does."""
    import json

    path = demo_model.CONFIGS / "vae" / "config.json"
    config = json.loads(path.read_text())
    config["scaling_factor"] = round(scale, 5)
    path.write_text(json.dumps(config, indent=2) + "\n")


# --- the generation check ----------------------------------------------------------------------


def check_prompts(n: int, seed: int = CHECK_SEED) -> list[tuple[str, W.Scene]]:
    """In-distribution prompts: full captions of fresh plain scenes (no toys, no styles)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        s = W.sample_scene(rng, toy="", style="")
        out.append((W.caption(s, full=True), s))
    return out


@torch.no_grad()
def generation_check(pipe, clip_model, n: int = 32, steps: int = 20, guidance: float = 5.0, seed: int = CHECK_SEED,
                     batch: int = 16) -> dict:
    """Generate one picture per prompt; the judge picks among the 48 "a {colour} {shape}" prompts."""
    from diffusers import DPMSolverMultistepScheduler

    from demo.common import shape_colour_accuracy

    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++")
    items = check_prompts(n, seed)
    images = []
    for i in range(0, n, batch):
        chunk = items[i : i + batch]
        gens = [torch.Generator().manual_seed(seed + i + j) for j in range(len(chunk))]
        out = pipe([p for p, _ in chunk], num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                   output_type="np").images
        images.append(np.clip(np.rint(out * 255), 0, 255).astype(np.uint8))
    images = np.concatenate(images)
    report = shape_colour_accuracy(clip_model, to_tensor(images), [s for _, s in items])
    report["n"] = n
    return report, images


def check(args) -> None:
    torch.set_num_threads(args.threads)
    pipe = demo_model.build_demo_pipeline(args.unet)
    clip_model, _, _ = demo_model.load_demo_clip()
    t = time.time()
    report, images = generation_check(pipe, clip_model, n=args.n, steps=args.sample_steps, guidance=args.guidance)
    report["seconds"] = round(time.time() - t, 1)
    print(report, flush=True)
    if args.grid:
        from PIL import Image

        cols = 8
        rows = math.ceil(len(images) / cols)
        grid = np.zeros((rows * 32, cols * 32, 3), np.uint8)
        for i, im in enumerate(images):
            grid[(i // cols) * 32 : (i // cols + 1) * 32, (i % cols) * 32 : (i % cols + 1) * 32] = im
        Image.fromarray(W.upsample(grid, 4)).save(args.grid)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("stage", choices=("vae", "unet", "check"))
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pool", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--kl-weight", type=float, default=1e-6)
    ap.add_argument("--drop", type=float, default=0.1, help="caption dropout (classifier-free guidance)")
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--v2-from", type=int, default=2750,
                    help="unet: from this step, caption variety 2 and toys/paintings drawn twice as often "
                         "(the shipped model switched at 2750, after a first look at inversions)")
    ap.add_argument("--v3-from", type=int, default=8000,
                    help="unet: from this step, caption variety 3 (the other toys and styles named, the held-out "
                         "ones never); the shipped model trained 8000 steps without, then 2000 with")
    ap.add_argument("--save-every", type=int, default=250)
    ap.add_argument("--text-tower", default=str(demo_model.CLIP_WEIGHTS),
                    help="safetensors of the demo CLIP whose text tower conditions the UNet")
    ap.add_argument("--build", default=str(BUILD))
    ap.add_argument("--unet", default=None, help="check: a UNet safetensors to use instead of the shipped one")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--sample-steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--grid", default=None, help="check: write the generated pictures as a PNG grid")
    args = ap.parse_args(argv)
    defaults = {"vae": dict(steps=1500, batch=32, lr=1e-3, pool=40000),
                "unet": dict(steps=10000, batch=64, lr=5e-4, pool=150000),
                "check": dict(steps=0, batch=0, lr=0.0, pool=0)}[args.stage]
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    {"vae": train_vae, "unet": train_unet, "check": check}[args.stage](args)


if __name__ == "__main__":
    main()
