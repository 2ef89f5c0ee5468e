"""The inversion: learn one new word's vector, everything else frozen.

Read `Inversion.run` top to bottom: it is the whole training loop.  K runs
(K >= 1) train together: row k of every batch belongs to run k, with its own
token slot, vector, optimizer state and random streams, so a batched run ends
where its solo run would.

What must stay true (see docs/architecture.md):
  * only the placeholder vectors (fp32) are optimized; UNet, VAE, text encoder
    and every row of the token table are frozen, bit for bit;
  * loss = MSE(UNet prediction, noise or velocity) at a random training timestep
    on a cached latent of a random image/flip, under a random prompt template;
  * a run killed anywhere resumes from its last checkpoint and ends exactly where
    an uninterrupted run with the same seed ends (all RNG state is checkpointed).
"""

from __future__ import annotations

import contextlib
import io
import math
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F

from engine import checkpoints
from engine.data import default_preview_prompt, encode_images, load_images, templates_for
from engine.errors import JobCancelled, UserError
from engine.faults import maybe_fault
from engine.gpu import memory_figures
from engine.optim import RowAdamW
from engine.paths import atomic_write_bytes
from engine.placeholder import add_slots, initial_vectors, placeholders_installed, slot_tokens

LR_SCHEDULES = ("constant", "warmup", "cosine")
COMPILE_MODES = ("off", "default", "reduce-overhead")
PREDICTION_TYPES = ("epsilon", "v_prediction")  # what the loss knows how to target


@dataclass
class TrainConfig:
    """One run's settings.  Defaults are the study's (lr 5e-4, batch 1, AdamW)."""

    token: str
    init: str
    property: str = "object"
    steps: int = 2000
    lr: float = 5e-4
    batch_size: int = 1
    weight_decay: float = 1e-2
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    seed: int = 0
    save_every: int = 500
    preview_every: int = 500
    preview_prompt: str | None = None
    preview_steps: int = 25
    preview_seed: int = 0
    log_every: int = 10
    resolution: int | None = None  # None: the model's own
    center_crop: bool = False
    flip_p: float = 0.5
    templates: list[str] | None = None  # custom prompt templates with "{}" for the token
    low_vram: bool = False  # gradient checkpointing through the UNet: less memory, ~2x slower
    compile: str = "off"  # off | default | reduce-overhead (CUDA graphs): torch.compile the UNet
    fixed_timestep: int | None = None  # tests: overfit one timestep
    fixed_noise: bool = False  # tests: one fixed noise sample

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def validate(self) -> None:
        checks = [
            (self.steps >= 1, "--steps must be at least 1"),
            (self.lr > 0 and math.isfinite(self.lr), "--lr must be a positive number"),
            (self.batch_size >= 1, "--batch-size must be at least 1"),
            (self.save_every >= 1, "--save-every must be at least 1"),
            (self.preview_every >= 0, "--preview-every must be 0 (off) or more"),
            (self.log_every >= 1, "--log-every must be at least 1"),
            (self.lr_schedule in LR_SCHEDULES, f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}"),
            (0.0 <= self.flip_p <= 1.0, "--flip must be between 0 and 1"),
            (self.compile in COMPILE_MODES, f"--compile must be one of {', '.join(COMPILE_MODES)}"),
            (self.templates is None or (len(self.templates) > 0 and all(t.count("{}") == 1 for t in self.templates)),
             "each prompt template must contain exactly one {} where the token goes"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)

    def lr_at(self, step: int) -> float:
        warm = self.warmup_steps if self.lr_schedule in ("warmup", "cosine") else 0
        if step < warm:
            return self.lr * (step + 1) / warm
        if self.lr_schedule == "cosine":
            progress = (step - warm) / max(1, self.steps - warm)
            return self.lr * 0.5 * (1 + math.cos(math.pi * progress))
        return self.lr


class Reporter(Protocol):
    def emit(self, type: str, **fields) -> None: ...
    def cancelled(self) -> bool: ...


class QuietReporter:
    """For scripts and tests: collects events, never cancels."""

    def __init__(self):
        self.events: list[dict] = []

    def emit(self, type: str, **fields) -> None:
        self.events.append({"type": type, **fields})

    def cancelled(self) -> bool:
        return False


@dataclass
class RunSlot:
    """One of the K runs trained together."""

    config: TrainConfig
    run_dir: Path
    images: list[Path]
    reporter: Reporter = field(default_factory=QuietReporter)


class Inversion:
    def __init__(self, model, slots: list[RunSlot]):
        self.model = model
        self.slots = slots
        self.k = len(slots)
        self.device = model.device
        for slot in slots:
            slot.config.validate()
        self._check_compatible()
        self.cfg0 = slots[0].config
        self.tokenizer = _tokenizer_copy(model.tokenizer)
        self.slot_ids = add_slots(self.tokenizer, self.k)
        init_ids = [_single_token_id(self.tokenizer, s.config.init) for s in slots]
        self.vectors = initial_vectors(model.text_encoder, init_ids).requires_grad_(True)
        self.optimizer = RowAdamW(lr=self.cfg0.lr, weight_decay=self.cfg0.weight_decay)
        scale = 2.0**16 if model.dtype == torch.float16 else 1.0
        self.state = self.optimizer.init_state(self.vectors.detach(), loss_scale=scale)
        self.scheduler = model.noise_scheduler()
        _check_prediction_type(self.scheduler.config.prediction_type)
        self.resolution = self.cfg0.resolution or model.info.resolution
        self.prompt_ids = [self._tokenize_templates(k) for k in range(self.k)]
        self.latents = [
            encode_images(model.vae, load_images(s.images), self.resolution, s.config.center_crop) for s in slots
        ]
        self.generators = [torch.Generator().manual_seed(s.config.seed) for s in slots]
        self.start_step = 0
        self.unet = compiled_unet(model, self.cfg0.compile)

    # --- setup -------------------------------------------------------------------------------

    def _check_compatible(self) -> None:
        """Batched runs share one step counter and schedule; only seed, init word and data differ."""
        shared = ("steps", "lr", "batch_size", "weight_decay", "lr_schedule", "warmup_steps", "resolution")
        first = self.slots[0].config
        for slot in self.slots[1:]:
            for name in shared:
                if getattr(slot.config, name) != getattr(first, name):
                    raise UserError(f"batched runs must share --{name.replace('_', '-')}; run them separately")

    def _tokenize_templates(self, k: int) -> torch.Tensor:
        slot = slot_tokens(self.k)[k]
        cfg = self.slots[k].config
        prompts = [t.format(slot) for t in (cfg.templates or templates_for(cfg.property))]
        ids = self.tokenizer(
            prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
            truncation=True, return_tensors="pt",
        ).input_ids
        return ids.to(self.device)

    # --- checkpoints -------------------------------------------------------------------------

    def resume(self) -> int:
        """Load each run's latest checkpoint; all K must be at the same step."""
        found = [checkpoints.latest(s.run_dir) for s in self.slots]
        if all(f is None for f in found):
            return 0
        steps = {f.step if f else 0 for f in found}
        if len(steps) != 1:
            raise UserError("batched runs have checkpoints at different steps; resume them one by one")
        for k, ckpt in enumerate(found):
            checkpoints.restore_row(ckpt, k, self.vectors, self.state, self.generators[k])
        self.start_step = steps.pop()
        return self.start_step

    def _checkpoint(self, step: int) -> None:
        for k, slot in enumerate(self.slots):
            path = checkpoints.save_row(slot.run_dir, step, k, self.vectors, self.state, self.generators[k])
            slot.reporter.emit("checkpoint", step=step, path=str(path))

    def _save_embedding(self, step: int, final: bool = False) -> None:
        from engine.formats import write_embedding

        for k, slot in enumerate(self.slots):
            vec = self.vectors.detach()[k : k + 1].float().cpu()
            if not torch.isfinite(vec).all():
                raise FloatingPointError("the embedding is not finite")
            name = "learned_embeds.safetensors" if final else f"embeddings/learned_embeds-steps-{step}.safetensors"
            path = write_embedding(slot.run_dir / name, vec, slot.config.token, "diffusers", step=step)
            slot.reporter.emit("embedding", step=step, path=str(path), final=final)

    # --- one step ----------------------------------------------------------------------------

    def _draw(self) -> tuple[torch.Tensor, ...]:
        """Each run draws its own image, flip, template, timestep and noise from its own stream."""
        b = self.cfg0.batch_size
        cache0 = self.latents[0]
        latent_shape = cache0.mean.shape[2:]
        lat, noise, ids, ts = [], [], [], []
        for k, slot in enumerate(self.slots):
            g, cfg, cache = self.generators[k], slot.config, self.latents[k]
            index = torch.randint(0, cache.num_images, (b,), generator=g)
            flip = (torch.rand((b,), generator=g) < cfg.flip_p).long()
            template = torch.randint(0, self.prompt_ids[k].shape[0], (b,), generator=g)
            t = torch.randint(0, self.scheduler.config.num_train_timesteps, (b,), generator=g)
            if cfg.fixed_timestep is not None:
                t.fill_(cfg.fixed_timestep)
            posterior_noise = torch.randn((b, *latent_shape), generator=g)
            n = torch.randn((b, *latent_shape), generator=g)
            if cfg.fixed_noise:
                posterior_noise.zero_()
                n = torch.randn((b, *latent_shape), generator=torch.Generator().manual_seed(cfg.seed))
            lat.append(cache.sample(index, flip, posterior_noise.to(cache.mean.device)))
            noise.append(n)
            ids.append(self.prompt_ids[k][template.to(self.device)])
            ts.append(t)
        cat = lambda xs: torch.cat(xs).to(self.device)  # noqa: E731
        return cat(lat), cat(noise), cat(ids), cat(ts)

    def _loss_rows(self) -> torch.Tensor:
        """Per-run MSE loss, [K] fp32, still on the device (no host sync)."""
        latents, noise, ids, t = self._draw()
        dtype = self.model.dtype
        noisy = self.scheduler.add_noise(latents, noise, t)
        hidden = self.model.text_encoder(ids)[0]
        pred = self.unet(noisy.to(dtype), t, encoder_hidden_states=hidden).sample
        if self.scheduler.config.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(latents, noise, t)
        else:
            target = noise
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        return per_sample.view(self.k, -1).mean(dim=1)

    # --- the loop ----------------------------------------------------------------------------

    def run(self) -> list[Path]:
        cfg = self.cfg0
        self._status("running", step=self.start_step, steps=cfg.steps)
        loss_sum = torch.zeros(self.k, device=self.device)
        bad = torch.zeros((), dtype=torch.bool, device=self.device)
        logged, t_log, t_start = 0, time.perf_counter(), time.perf_counter()
        self.scheduler.alphas_cumprod = self.scheduler.alphas_cumprod.to(self.device)
        with self.installed():
            for step in range(self.start_step, cfg.steps):
                if any(s.reporter.cancelled() for s in self.slots):
                    self._checkpoint(step)
                    raise JobCancelled(f"cancelled at step {step}")
                loss = self.train_step(step)
                if maybe_fault("loss", step + 1) == "nan":
                    loss = loss * float("nan")
                loss_sum += loss
                bad |= ~torch.isfinite(loss.detach()).all()
                logged += 1
                done = step + 1
                maybe_fault("step", done)
                if done % cfg.log_every == 0 or done == cfg.steps:
                    if bool(bad):  # the one host sync per logging interval
                        raise FloatingPointError(f"loss became NaN/inf by step {done}")
                    now = time.perf_counter()
                    self._log(done, loss_sum / logged, logged / (now - t_log), now - t_start, cfg.lr_at(step))
                    loss_sum.zero_()
                    logged, t_log = 0, now
                if done % cfg.save_every == 0 or done == cfg.steps:
                    self._save_embedding(done)
                    self._checkpoint(done)
                if cfg.preview_every and (done % cfg.preview_every == 0 or done == cfg.steps):
                    self._preview(done)
        self._save_embedding(cfg.steps, final=True)
        return [s.run_dir / "learned_embeds.safetensors" for s in self.slots]

    def train_step(self, step: int) -> torch.Tensor:
        """Forward, backward, one AdamW update of the vectors; returns the [K] loss (no sync)."""
        loss = self._loss_rows()
        (loss * self.state["loss_scale"]).sum().backward()
        self.optimizer.step(self.vectors.data, self.vectors.grad, self.state, self.cfg0.lr_at(step))
        self.vectors.grad = None
        return loss.detach()

    @contextlib.contextmanager
    def installed(self):
        """The placeholder rows (and low-VRAM checkpointing) on the shared model, for the run only."""
        unet = self.model.unet
        if self.cfg0.low_vram:
            unet.enable_gradient_checkpointing()
        try:
            with placeholders_installed(self.model.text_encoder, self.vectors):
                yield
        finally:
            if self.cfg0.low_vram:
                unet.disable_gradient_checkpointing()

    def _log(self, step: int, loss: torch.Tensor, steps_per_s: float, elapsed: float, lr: float) -> None:
        losses = loss.tolist()
        vram = memory_figures(self.device)
        remaining = (self.cfg0.steps - step) / steps_per_s if steps_per_s > 0 else None
        for k, slot in enumerate(self.slots):
            slot.reporter.emit(
                "step", step=step, steps=self.cfg0.steps, loss=losses[k], lr=lr,
                steps_per_s=steps_per_s, elapsed=elapsed, eta=remaining,
                loss_scale=float(self.state["loss_scale"][k]), skipped=int(self.state["skipped"][k]), **vram,
            )

    def _status(self, status: str, **extra) -> None:
        for slot in self.slots:
            slot.reporter.emit("status", status=status, **extra)

    @torch.no_grad()
    def _preview(self, step: int) -> None:
        """One image per run from a fixed prompt and seed; never touches the training RNG."""
        from engine.generate import sample_images

        for k, slot in enumerate(self.slots):
            cfg = slot.config
            prompt = (cfg.preview_prompt or default_preview_prompt(cfg.property, "{token}")).replace(
                "{token}", slot_tokens(self.k)[k]
            ).replace(cfg.token, slot_tokens(self.k)[k])
            ids = self.tokenizer(
                [prompt], padding="max_length", max_length=self.tokenizer.model_max_length,
                truncation=True, return_tensors="pt",
            ).input_ids.to(self.device)
            embeds = self.model.text_encoder(ids)[0]
            image = sample_images(
                self.model, embeds, seeds=[cfg.preview_seed], steps=cfg.preview_steps, guidance=7.5
            )[0]
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            path = slot.run_dir / "previews" / f"step-{step}.png"
            atomic_write_bytes(path, buf.getvalue())
            slot.reporter.emit("preview", step=step, path=str(path),
                               prompt=prompt.replace(slot_tokens(self.k)[k], cfg.token))


def compiled_unet(model, mode: str):
    """The UNet, or a torch.compile'd wrapper kept on the warm model so later runs skip the warm-up."""
    if mode == "off":
        return model.unet
    cache = model.__dict__.setdefault("_compiled", {})
    if mode not in cache:
        cache[mode] = torch.compile(model.unet, mode=None if mode == "default" else mode)
    return cache[mode]


def _tokenizer_copy(tokenizer):
    import copy

    return copy.deepcopy(tokenizer)


def _check_prediction_type(prediction_type: str) -> None:
    """The loss targets the noise (epsilon) or the velocity (v_prediction); refuse anything else."""
    if prediction_type not in PREDICTION_TYPES:
        raise UserError(f"this model's scheduler predicts {prediction_type!r}; only {' and '.join(PREDICTION_TYPES)} "
                        "models can be trained (check prediction_type in its scheduler config)")


def _single_token_id(tokenizer, word: str) -> int:
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise UserError(f"initializer {word!r} is {len(ids)} tokens for this model; choose a single-token word")
    return ids[0]


def train(model, config: TrainConfig, run_dir: Path, images: list[Path], reporter: Reporter | None = None,
          resume: bool = True) -> Path:
    """Train one run to the end (resuming from its checkpoints when present)."""
    return train_many(model, [RunSlot(config, Path(run_dir), list(images), reporter or QuietReporter())], resume)[0]


def train_many(model, slots: list[RunSlot], resume: bool = True) -> list[Path]:
    inversion = Inversion(model, slots)
    if resume:
        inversion.resume()
    return inversion.run()
