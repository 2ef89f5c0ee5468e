"""Train the demo's small CLIP (the judge, and the generator's text encoder) on the world.

    python -m demo.train_clip            # ~1 h on 1 CPU thread; resumes from its checkpoint

open_clip's CLIP architecture from engine/sd/demo_weights/clip_config.json, trained
contrastively (symmetric InfoNCE, learnable temperature) on world images and
their captions *with* the toy and style names (the judge knows more words than
the generator).  Writes engine/sd/demo_weights/clip.safetensors (fp16) and the loss
curve and evaluations to demo/logs/clip.json.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from demo import world as W
from demo.common import (
    BUILD,
    LOGS,
    Log,
    clip_text_ids,
    encode_text_short,
    judge_report,
    resume,
    roundtrip,
    save_checkpoint,
    save_fp16,
    to_tensor,
)
from engine.sd import demo_model


def param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.ndim < 2 or "embedding" in name or "logit_scale" in name or name.endswith("class_embedding"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def shape_groups(images, batch_scenes, rng, share: float):
    """Hard negatives: replace a share of the batch by groups of 4 pictures alike but for the shape.

    Colour, background and the toys are told apart early; shape, a finer detail,
    is learnt much faster when some negatives differ in nothing else."""
    from dataclasses import replace

    n_groups = int(len(images) * share) // 4
    images = images.copy()
    batch_scenes = list(batch_scenes)
    for g in range(n_groups):
        base = W.sample_scene(rng, toy="")
        shapes = rng.permutation(len(W.SHAPES))[:4]
        for j, k in enumerate(shapes):
            s = replace(base, shape=W.SHAPES[k])
            images[4 * g + j] = W.render(s)
            batch_scenes[4 * g + j] = s
    return images, batch_scenes


TEXT_TOWER = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.")


def freeze_text_tower(model, export) -> None:
    """Freeze the text tower (what the generator's CLIPTextModel holds); the image side trains on.

    The tower is exported (the whole CLIP, fp16) so the UNet can train on it while
    the judge's image tower finishes: the shipped clip.safetensors then holds
    exactly these text weights."""
    for name, p in model.named_parameters():
        if name.startswith(TEXT_TOWER):
            p.requires_grad_(False)
            p.grad = None
    if not __import__("pathlib").Path(export).exists():
        save_fp16(model.state_dict(), __import__("pathlib").Path(export))
        # train on from the fp16-rounded values, as the pipeline will load them
        from safetensors.torch import load_file

        state = load_file(str(export))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.startswith(TEXT_TOWER):
                    p.copy_(state[name].float())
    print(f"text tower frozen, exported to {export}", flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=150)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pool", type=int, default=80000, help="world images rendered up front (seed 1)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--hard-shape", type=float, default=0.5,
                    help="share of each batch made of groups of 4 pictures that differ only in shape")
    ap.add_argument("--hard-shape-from", type=int, default=500,
                    help="the shipped judge added the shape groups at step 500, when shape was still at chance")
    ap.add_argument("--freeze-text-from", type=int, default=1000,
                    help="from this step on the text tower is frozen and exported for the generator's UNet")
    ap.add_argument("--build", default=str(BUILD))
    ap.add_argument("--out", default=str(demo_model.CLIP_WEIGHTS))
    ap.add_argument("--log", default=str(LOGS / "clip.json"))
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    build = __import__("pathlib").Path(args.build)
    build.mkdir(parents=True, exist_ok=True)
    ckpt_path = build / "clip_ckpt.pt"

    model = demo_model.build_clip()
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    rng = np.random.default_rng(args.seed)
    log = Log(args.log, {"script": "demo/train_clip.py", "args": vars(args), "pool_seed": 1, "eval_seed": 99,
                         "params": sum(p.numel() for p in model.parameters())})
    start = resume(ckpt_path, rng, model=model, opt=opt)

    t = time.time()
    pool_scenes = W.scenes(1, args.pool)
    pool = W.render_batch(pool_scenes)
    print(f"rendered {args.pool} images in {time.time() - t:.0f}s", flush=True)

    def lr_at(step):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        return args.lr * 0.5 * (1 + math.cos(math.pi * (step - args.warmup) / max(1, args.steps - args.warmup)))

    model.train()
    t_log, loss_acc, n_acc = time.time(), 0.0, 0
    for step in range(start, args.steps):
        if step == args.freeze_text_from or (step == start and step > args.freeze_text_from):
            freeze_text_tower(model, build / "clip_text_tower.safetensors")
        idx = rng.integers(0, args.pool, args.batch)
        images = pool[idx]
        batch_scenes = [pool_scenes[i] for i in idx]
        if args.hard_shape > 0 and step >= args.hard_shape_from:
            images, batch_scenes = shape_groups(images, batch_scenes, rng, args.hard_shape)
        rt = rng.random(args.batch) < 0.25
        if rt.any():
            images = images.copy()
            images[rt] = roundtrip(images[rt])
        caps = [W.caption(s, rng, names=True) for s in batch_scenes]
        img_f = model.encode_image(to_tensor(images))
        txt_f = encode_text_short(model, clip_text_ids(caps))
        img_f = F.normalize(img_f, dim=-1)
        txt_f = F.normalize(txt_f, dim=-1)
        logits = model.logit_scale.exp().clamp(max=100) * img_f @ txt_f.T
        # captions can describe several images of a batch: identical captions are not negatives
        same = torch.tensor([[a == b for b in caps] for a in caps])
        target = same.float() / same.float().sum(1, keepdim=True)
        loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target.T))
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        loss_acc += loss.item()
        n_acc += 1
        done = step + 1
        if done % 25 == 0:
            rate = n_acc / (time.time() - t_log)
            log.loss(done, loss_acc / n_acc, lr=round(lr_at(step), 6), steps_per_s=round(rate, 3),
                     temperature=round(float(model.logit_scale.exp()), 2))
            print(f"step {done} loss {loss_acc / n_acc:.4f} {rate:.2f} it/s", flush=True)
            t_log, loss_acc, n_acc = time.time(), 0.0, 0
        if done % args.eval_every == 0 or done == args.steps:
            model.eval()
            report = judge_report(model)
            model.train()
            log.eval(done, **report)
            print(f"eval {done}: {report}", flush=True)
            save_checkpoint(ckpt_path, rng, done, model=model, opt=opt)
            log.save()
    model.eval()
    save_fp16(model.state_dict(), __import__("pathlib").Path(args.out), {"steps": args.steps, "seed": args.seed})
    log.save(finished=True)
    print("saved", args.out, flush=True)


if __name__ == "__main__":
    main()
