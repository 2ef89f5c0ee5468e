"""The inversion: learn one new word's vectors, everything else frozen.

Read `Inversion.run` top to bottom: it is the whole training loop.  K runs
(K >= 1) train together: row k of every batch belongs to run k, with its own
token slots, vectors, optimizer state and random streams, so a batched run ends
where its solo run would.

A word is N vectors (`--vectors`) in each text encoder the model family names
(engine.sd.family: one for SD 1.x/2.x, two for SDXL).  Run k's whole word is row k
of the trained matrix `vectors` [K, P] (engine.sd.placeholder.WordLayout), so one
optimizer row is one run, however many vectors and encoders it has.

What must stay true (see docs/architecture.md):
  * only the placeholder vectors (fp32) are optimized; UNet, VAE, text encoders
    and every row of the token tables are frozen, bit for bit;
  * loss = MSE(UNet prediction, noise or velocity) at a random training timestep
    on a cached latent of a random image/flip, under a random prompt template;
  * a run killed anywhere resumes from its last checkpoint and ends where an
    uninterrupted run with the same seed ends (all RNG state is checkpointed): bit
    for bit on a CPU, and on CUDA with --deterministic; without it within
    engine.devices.determinism.CUDA_TOLERANCE;
  * with --grad-accum G, one optimizer step averages G micro-batches, each drawn
    from the run's own stream, so resume stays exact at any step boundary;
  * a step's draws reach the device in one non-blocking copy (`_draw`, `_upload`):
    the step never waits on the host.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F

from engine.devices.determinism import deterministic
from engine.devices.runtime import memory_figures, reset_peak_memory
from engine.errors import JobCancelled, UserError
from engine.faults import maybe_fault
from engine.inversion.compiled import compiled_unet
from engine.inversion.data import templates_for
from engine.inversion.dataset import build_run_data
from engine.inversion.ema import WordEMA
from engine.inversion.monitor import Monitor
from engine.inversion.optim import RowAdamW
from engine.inversion.probes import preview
from engine.inversion.regularize import Regularizer, vector_figures, vocab_norms
from engine.inversion.staging import Staging
from engine.inversion.words import RunWords
from engine.sd.placeholder import WordLayout, initial_vectors
from engine.sd.vae import plan_for
from engine.settings.train import COMPILE_MODES, LR_SCHEDULES, TrainConfig  # noqa: F401 (re-exported)
from engine.store import checkpoints

PREDICTION_TYPES = ("epsilon", "v_prediction")  # what the loss knows how to target


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
    home: Path | None = None  # the library, for --init-from NAME@RUN:STEP (default: the run's own)
    description: str | None = None  # the concept's description: the probes' SD row (default: the initializer)


@dataclass
class Batch:
    """One micro-batch on the device: K runs' rows, run k's `batch_size` rows k-th."""

    latents: torch.Tensor  # scaled latents, sampled from the cached posteriors
    noise: torch.Tensor
    ids: list[torch.Tensor]  # prompt token ids, one tensor per text encoder
    timesteps: torch.Tensor  # int64
    micro: torch.Tensor  # SDXL's size conditioning (add_time_ids); other families ignore it
    weights: torch.Tensor | None = None  # --masked-loss: per latent pixel, [B, 1, h, w]


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
        self.family = model.family
        self.encoders = model.encoders
        self.n = self.cfg0.vectors
        self.layout = WordLayout(tuple(model.info.text_widths), self.n, _layer_count(model, self.cfg0))
        self.run_words = RunWords(model, self.layout, self.device, self.k)  # slots, prompts, per-layer hook
        self.tokenizers, self.words = self.run_words.tokenizers, [w[0] for w in self.run_words.words]
        rows = [self._initial_row(slot) for slot in slots]
        self.vectors = torch.stack(rows).to(self.device).requires_grad_(True)  # [K, P] fp32
        self.init_rows = self.vectors.detach().clone()  # where each run started (figures, regularisers)
        self.regularizer = Regularizer.build(self.layout, self.init_rows, [s.config for s in slots], self.encoders)
        self.optimizer = RowAdamW(lr=self.cfg0.lr, weight_decay=self.cfg0.weight_decay)
        self.loss_scaling = model.dtype == torch.float16  # fp16 gradients underflow unscaled; bf16's do not
        self.state = self.optimizer.init_state(self.vectors.detach(), scaling=self.loss_scaling)
        self.scheduler = model.noise_scheduler()
        _check_prediction_type(self.scheduler.config.prediction_type)
        self.resolution = self.cfg0.resolution or model.info.resolution
        # How many images the VAE encodes at once, from the free memory (SDXL's fp32 VAE at 1024 px
        # needs ~3 GiB an image); the header event says what was chosen.
        self.vae_plan = plan_for(model, self.resolution, self.resolution, batch=1)
        self.data = [build_run_data(self, k) for k in range(self.k)]  # latents (per bucket), masks, prompts
        self.latents = [d.buckets[0].cache for d in self.data]  # each run's one cache (--buckets: its first)
        self.prompt_ids = [d.prompt_ids for d in self.data]
        self.ema = WordEMA(self.cfg0.ema, self.vectors) if self.cfg0.ema else None  # --ema: the word saved
        self.generators = [torch.Generator().manual_seed(s.config.seed) for s in slots]
        self.start_step = 0
        self.unet = compiled_unet(model, self.cfg0.compile, batch=self.k * self.cfg0.batch_size,
                                  resolution=self.resolution, low_vram=self.cfg0.low_vram)
        self.determinism = {"deterministic": False}  # what --deterministic did (train_many sets it)
        self.stopped: set[int] = set()  # runs that met a --stop-when rule (engine.inversion.monitor)

    # --- setup -------------------------------------------------------------------------------

    def _check_compatible(self) -> None:
        """Batched runs share one step counter and schedule; only seed, init word and data differ."""
        shared = ("steps", "lr", "batch_size", "grad_accum", "weight_decay", "lr_schedule", "warmup_steps",
                  "resolution", "vectors", "deterministic", "dloss_every", "probe_every", "per_layer")
        first = self.slots[0].config
        for slot in self.slots[1:]:
            for name in (*shared, "masked_loss", "buckets", "ema"):
                if getattr(slot.config, name) != getattr(first, name):
                    raise UserError(f"batched runs must share --{name.replace('_', '-')}; run them separately")
        if first.buckets and self.k > 1:  # each run draws its own bucket: one image size per step each
            raise UserError("--buckets trains one run at a time (a batch holds one image size); run them separately")

    def _initial_row(self, slot: RunSlot) -> torch.Tensor:
        """Run k's starting word as one row (`initial_row`)."""
        return initial_row(self.model, slot, self.layout, self.tokenizers, self.run_words.layer_keys)

    def _tokenize_templates(self, k: int, templates: list[str] | None = None) -> list[torch.Tensor]:
        """Run k's prompt templates with its word, tokenized once per encoder: [T, 77] (per-layer: [T, L, 77])."""
        cfg = self.slots[k].config
        return self.run_words.tokenize(k, templates or cfg.templates or templates_for(cfg.property))

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
            missing = checkpoints.restore_row(ckpt, k, self.vectors, self.state, self.generators[k], self._extra())
            if missing and self.ema:  # a checkpoint from before --ema was kept: the average starts here
                self.ema.rows[k].copy_(self.vectors.detach()[k])
        self.optimizer.use_scaling(self.state, self.loss_scaling)  # this run's dtype decides, not the checkpoint's
        self.start_step = steps.pop()
        return self.start_step

    def live(self) -> list[tuple[int, RunSlot]]:
        """The runs still training (a batched run that met its --stop-when has ended; the others go on)."""
        return [(k, slot) for k, slot in enumerate(self.slots) if k not in self.stopped]

    def _checkpoint(self, step: int) -> None:
        for k, slot in self.live():
            path = checkpoints.save_row(slot.run_dir, step, k, self.vectors, self.state, self.generators[k],
                                        layout=self.layout, extra=self._extra())
            slot.reporter.emit("checkpoint", step=step, path=str(path))
            if slot.config.keep_checkpoints:
                checkpoints.prune(slot.run_dir, slot.config.keep_checkpoints)

    def _extra(self) -> dict:
        """What a checkpoint keeps besides the vectors and the optimizer: the --ema average."""
        return {"ema": self.ema.rows} if self.ema else {}

    def word_rows(self) -> torch.Tensor:
        """The rows a run saves and shows: the --ema average, else the vectors trained."""
        return (self.ema.rows if self.ema else self.vectors).detach()

    def _save_embedding(self, step: int, final: bool = False, only: list[int] | None = None) -> None:
        from engine.sd.formats import run_format, write_embedding

        for k, slot in self.live() if only is None else [(k, self.slots[k]) for k in only]:
            row = self.word_rows()[k].float().cpu()
            if not torch.isfinite(row).all():
                raise FloatingPointError("the embedding is not finite")
            blocks = self.layout.split(row)
            name = "learned_embeds.safetensors" if final else f"embeddings/learned_embeds-steps-{step}.safetensors"
            keys = self.run_words.layer_keys
            path = write_embedding(slot.run_dir / name, blocks, slot.config.token, run_format(blocks, keys), step=step,
                                   layers=keys)
            slot.reporter.emit("embedding", step=step, path=str(path), final=final)

    # --- one step ----------------------------------------------------------------------------

    def _draw(self, micro_batches: int = 1) -> list[Batch]:
        """One optimizer step's micro-batches.  Each run draws its own image, flip, template,
        timestep and noise from its own stream on the host (micro-batch by micro-batch, as
        ever, so resumes and batches stay exact); all of it reaches the device in one copy."""
        staging = Staging()
        drawn = [[self._draw_run(k, staging) for k in range(self.k)] for _ in range(micro_batches)]
        parts = staging.unpack(self._upload(staging.pack(pin=self.device.type == "cuda")))
        return [self._assemble(runs, parts) for runs in drawn]

    def _draw_run(self, k: int, staging: Staging) -> dict[str, int]:
        """Run k's draws for one micro-batch, staged on the host; returns where each one is."""
        return self.data[k].draw(self.generators[k], self.slots[k].config, self.cfg0.batch_size,
                                 self.scheduler.config.num_train_timesteps, staging)

    def _assemble(self, runs: list[dict[str, int]], parts: list[torch.Tensor]) -> Batch:
        """One micro-batch on the device from the uploaded draws: row block k is run k's."""
        lat, noise, ids, ts, micro, weights = [], [], [[] for _ in self.encoders], [], [], []
        for k, run in enumerate(runs):
            index, flip, template = parts[run["index"]], parts[run["flip"]], parts[run["template"]]
            cache = self.data[k].cache(run)  # its bucket's
            lat.append(cache.sample(index, flip, parts[run["posterior_noise"]]))
            weights.append(cache.weights(index, flip))
            noise.append(parts[run["noise"]])
            for e, encoder_ids in enumerate(self.prompt_ids[k]):
                ids[e].append(encoder_ids[template])
            ts.append(parts[run["t"]])
            micro.append(parts[run["micro"]])
        return Batch(torch.cat(lat), torch.cat(noise), [torch.cat(x) for x in ids], torch.cat(ts), torch.cat(micro),
                     torch.cat(weights) if weights[0] is not None else None)

    def _upload(self, host: torch.Tensor) -> torch.Tensor:
        """The step's one host-to-device copy.  From pinned memory, `non_blocking` returns at
        once: the GPU copies while the host goes on (the architecture's rule: no host sync)."""
        return host.to(self.device, non_blocking=True)

    def _loss_rows(self, batch: Batch) -> torch.Tensor:
        """Per-run MSE loss, [K] fp32, still on the device (no host sync)."""
        latents, noise, t = batch.latents, batch.noise, batch.timesteps
        dtype = self.model.dtype
        noisy = self.scheduler.add_noise(latents, noise, t)
        conditioning = self.run_words.condition(batch.ids, batch.micro)
        pred = self.unet(noisy.to(dtype), t, **conditioning).sample
        if self.scheduler.config.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(latents, noise, t)
        else:
            target = noise
        per_pixel = F.mse_loss(pred.float(), target.float(), reduction="none")
        if batch.weights is not None:  # --masked-loss: kohya's plain mean of the weighted loss
            per_pixel = per_pixel * batch.weights
        per_sample = per_pixel.mean(dim=(1, 2, 3))
        return per_sample.view(self.k, -1).mean(dim=1)

    # --- the loop ----------------------------------------------------------------------------

    def run(self) -> list[Path]:
        cfg = self.cfg0
        self._status("running", step=self.start_step, steps=cfg.steps)
        reset_peak_memory(self.device)  # the step events' vram_peak is this training's
        self._header()
        loss_sum = torch.zeros(self.k, device=self.device)
        bad = torch.zeros((), dtype=torch.bool, device=self.device)
        logged, t_log, t_start = 0, time.perf_counter(), time.perf_counter()
        self.scheduler.alphas_cumprod = self.scheduler.alphas_cumprod.to(self.device)
        monitor = Monitor(self)  # the deterministic loss, probes, warnings, --stop-when, the best step
        with self.installed():
            end = self.start_step if monitor.begin() else cfg.steps
            for step in range(self.start_step, end):
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
                if monitor.after_step(done) or done % cfg.save_every == 0 or done == cfg.steps:
                    self._save_embedding(done)
                    self._checkpoint(done)
                if cfg.preview_every and (done % cfg.preview_every == 0 or done == cfg.steps):
                    with self.ema.shown(self.vectors) if self.ema else contextlib.nullcontext():
                        preview(self, done)  # the word as saved
                if monitor.settle(done):  # every run has stopped (its rule, or the last step)
                    break
            monitor.settle(cfg.steps)  # a run resumed at its last step: its final embedding
        return [s.run_dir / "learned_embeds.safetensors" for s in self.slots]

    def train_step(self, step: int) -> torch.Tensor:
        """Forward and backward over --grad-accum micro-batches, then one AdamW update of the
        vectors; returns the [K] loss averaged over the micro-batches (no sync)."""
        accum, reg = self.cfg0.grad_accum, self.regularizer
        total = None
        for batch in self._draw(accum):
            loss = self._loss_rows(batch)
            objective = loss + reg.penalty(self.vectors) if reg is not None else loss
            # Dividing by a power of two is exact; any other G rounds the same way on every resume.
            (objective * (self.state["loss_scale"] / accum)).sum().backward()
            total = loss.detach() if total is None else total + loss.detach()
        grad = self.vectors.grad if reg is None else reg.project(self.vectors.detach(), self.vectors.grad)
        self.optimizer.step(self.vectors.data, grad, self.state, self.cfg0.lr_at(step))
        if reg is not None:
            reg.renormalize(self.vectors.data)
        if self.ema is not None:
            self.ema.update(self.vectors, step)
        self.vectors.grad = None
        return total / accum

    @contextlib.contextmanager
    def installed(self):
        """The placeholder rows (and low-VRAM checkpointing) on the shared model, for the run only."""
        unet = self.model.unet
        if self.cfg0.low_vram:
            unet.enable_gradient_checkpointing()
        try:
            with self.run_words.installed(self.vectors):
                yield
        finally:
            if self.cfg0.low_vram:
                unet.disable_gradient_checkpointing()

    def _header(self) -> None:
        """The run's header event: what is trained, and how (clients show it above the loss)."""
        cfg = self.cfg0
        for k, slot in enumerate(self.slots):
            slot.reporter.emit(
                "train", step=self.start_step, steps=cfg.steps, family=self.model.info.family,
                vectors=self.n, widths=list(self.layout.widths), batch_size=cfg.batch_size,
                grad_accum=cfg.grad_accum, effective_batch=cfg.effective_batch(), resolution=self.resolution,
                runs=self.k, init_from=slot.config.init_from, regularize=slot.config.regularize,
                reg_weight=slot.config.reg_weight, vocab_norms=vocab_norms(self.encoders),
                vae=self.vae_plan.describe(), init_mode=slot.config.init_mode, layers=list(self.run_words.layer_keys),
                **self.determinism, **self.data[k].describe(), prompts=self.data[k].prompts,
                masked_loss=cfg.masked_loss, ema=cfg.ema,
            )

    def _log(self, step: int, loss: torch.Tensor, steps_per_s: float, elapsed: float, lr: float) -> None:
        losses = loss.tolist()
        vram = memory_figures(self.device)
        remaining = (self.cfg0.steps - step) / steps_per_s if steps_per_s > 0 else None
        figures = vector_figures(self.layout, self.vectors.detach(), self.init_rows)
        penalty = self.regularizer.penalty(self.vectors.detach()).tolist() if self.regularizer else None
        for k, slot in self.live():
            slot.reporter.emit(
                "step", step=step, steps=self.cfg0.steps, loss=losses[k], lr=lr,
                steps_per_s=steps_per_s, elapsed=elapsed, eta=remaining,
                loss_scale=float(self.state["loss_scale"][k]), skipped=int(self.state["skipped"][k]),
                **figures[k], **({"reg": penalty[k]} if penalty else {}), **vram,
            )

    def _status(self, status: str, **extra) -> None:
        for slot in self.slots:
            slot.reporter.emit("status", status=status, **extra)


def _layer_count(model, cfg: TrainConfig) -> int:
    """How many vector sets a word has: one, or (--per-layer) one per UNet cross-attention layer."""
    if not cfg.per_layer:
        return 1
    from engine.sd.per_layer import unet_layers

    model.info.require_layers()  # a one-line refusal (SDXL, an unmappable UNet) before any work
    return len(unet_layers(model))


def initial_row(model, slot: RunSlot, layout: WordLayout, tokenizers, layer_keys=()) -> torch.Tensor:
    """A run's starting word as one row: the initializer's rows (--init-mode token), their text
    encoder outputs (cross, engine.inversion.cross_init), or an existing embedding (--init-from);
    a per-layer word starts every layer from the same vectors, as kohya's XTI does."""
    cfg, n = slot.config, layout.n
    if cfg.init_from:
        from engine.inversion.init_from import starting_blocks

        blocks = starting_blocks(cfg.init_from, model.info, n, slot.home or _library_home(slot.run_dir), layer_keys)
        return layout.join([b.float().cpu() for b in blocks])
    if cfg.init_mode == "cross":
        from engine.inversion.cross_init import cross_init_blocks

        blocks = cross_init_blocks(model.family, list(zip([e for e, _ in model.encoders], tokenizers)), cfg.init, n)
    else:
        blocks = [initial_vectors(encoder, _init_ids(tok, cfg.init, n))
                  for (encoder, _), tok in zip(model.encoders, tokenizers)]
    return layout.join([b.float().cpu().repeat(layout.layers, 1) for b in blocks])


def _init_ids(tokenizer, init: str, n: int) -> list[int]:
    """The initializer's token ids, one per vector (engine.store.library.initializer_ids: one rule everywhere)."""
    from engine.store.library import initializer_ids

    return initializer_ids(tokenizer, init, n)


def _library_home(run_dir: Path) -> Path:
    """The library a run directory belongs to (<home>/concepts/<name>/runs/<id>), else $TISTUDIO_HOME."""
    run_dir = Path(run_dir).resolve()
    if len(run_dir.parents) > 3 and run_dir.parent.name == "runs" and run_dir.parents[2].name == "concepts":
        return run_dir.parents[3]
    from engine.store.paths import home_dir

    return home_dir()


def _check_prediction_type(prediction_type: str) -> None:
    """The loss targets the noise (epsilon) or the velocity (v_prediction); refuse anything else."""
    if prediction_type not in PREDICTION_TYPES:
        raise UserError(f"this model's scheduler predicts {prediction_type!r}; only {' and '.join(PREDICTION_TYPES)} "
                        "models can be trained (check prediction_type in its scheduler config)")




def train(model, config: TrainConfig, run_dir: Path, images: list[Path], reporter: Reporter | None = None,
          resume: bool = True, description: str | None = None) -> Path:
    """Train one run to the end, or to its --stop-when (resuming from its checkpoints when present)."""
    slot = RunSlot(config, Path(run_dir), list(images), reporter or QuietReporter(), description=description)
    return train_many(model, [slot], resume)[0]


def train_many(model, slots: list[RunSlot], resume: bool = True) -> list[Path]:
    """Train K runs together (see Inversion); with --deterministic, torch's deterministic
    algorithms from the latent cache's encoding to the last step, and as they were after."""
    with deterministic(slots[0].config.deterministic) as determinism:
        inversion = Inversion(model, slots)
        inversion.determinism = determinism
        if resume:
            inversion.resume()
        return inversion.run()
