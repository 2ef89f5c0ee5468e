"""What the trainer measures about its word while it trains, besides the noisy loss.

* `DeterministicLoss`: the training objective (the loss's MSE, not a regulariser's penalty) on
  one fixed batch, without a gradient (DVAR, Voronov et al. 2023).  Per run, DLOSS_BATCH rows
  (DVAR's eval batch), drawn once by the training loop's own draw (image, flip, template,
  timestep, latent sample, noise) from a generator of the run's own seeded apart from its
  training stream, so that stream is never touched and a resumed run draws the same batch.
* `Prober`: reconstruction and editability as Table 1 defines them (engine.inversion.metrics),
  on a small fixed probe set: `--probe-images` images of the neutral prompt and
  `--probe-edit-images` of each edit prompt, seeds 0.. every time; the SD row (the concept's
  description where the word would stand) once, at the start.  The images are generated first
  with the rows being trained (as previews are), then the concept's judge is built, embeds
  them, and is freed (engine.inversion.judge); the training images' and the prompts' embeddings
  are kept on the host between probes.
* `preview`: one image per run from a fixed prompt and seed.

None of them reads or advances a training generator.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from engine.errors import UserError
from engine.inversion.data import default_preview_prompt
from engine.inversion.staging import Staging
from engine.store.paths import atomic_write_bytes

DLOSS_BATCH = 4  # DVAR's --eval_batch_size
DLOSS_STREAM = 0x5EED_D1055  # the fixed batch's generator: the run's seed xor this, never the training stream
PROBES_DIR = "probes"
GUIDANCE = 7.5  # Table 1's


# --- the deterministic loss ---------------------------------------------------------------------------


class DeterministicLoss:
    """The K runs' fixed batches, drawn once; `values()` is each run's loss on its own."""

    def __init__(self, inversion):
        self.inv = inversion
        staging = Staging()
        draws = -(-DLOSS_BATCH // inversion.cfg0.batch_size)  # micro-batches that make DLOSS_BATCH rows a run
        streams = [torch.Generator().manual_seed(s.config.seed ^ DLOSS_STREAM) for s in inversion.slots]
        training, inversion.generators = inversion.generators, streams  # the loop's own draws, from these streams
        try:
            drawn = [[inversion._draw_run(k, staging) for k in range(inversion.k)] for _ in range(draws)]
        finally:
            inversion.generators = training
        parts = staging.unpack(staging.pack(pin=False).to(inversion.device))
        self.batches = [inversion._assemble(runs, parts) for runs in drawn]
        # --buckets: micro-batches of other image sizes cannot be joined; each is measured alone
        same_size = len({tuple(b.latents.shape[1:]) for b in self.batches}) == 1
        self.batch = _by_run(self.batches, inversion.k) if same_size else None

    @torch.no_grad()
    def values(self) -> list[float]:
        """Each run's loss on its fixed batch with its vectors as they stand (the UNet uncompiled:
        this batch's shape is not the training step's)."""
        inv = self.inv
        compiled, inv.unet = inv.unet, inv.model.unet
        try:
            if self.batch is None:  # (one run: --buckets trains alone) the mean of equal-sized micro-batches
                return (sum(inv._loss_rows(b) for b in self.batches) / len(self.batches)).tolist()
            return inv._loss_rows(self.batch).tolist()
        finally:
            inv.unet = compiled


def _by_run(batches: list, k: int):
    """Micro-batches (rows: run 0's block, run 1's, ...) as one batch whose rows are again one
    block per run, each run's rows of every micro-batch together (what `_loss_rows` averages)."""
    rows = batches[0].timesteps.shape[0] // k
    order = torch.tensor([m * k * rows + r * rows + j for r in range(k) for m in range(len(batches))
                          for j in range(rows)])

    def joined(values):
        if values[0] is None:
            return None
        if isinstance(values[0], list):
            return [joined([v[e] for v in values]) for e in range(len(values[0]))]
        whole = torch.cat(values)
        return whole.index_select(0, order.to(whole.device))

    return type(batches[0])(**{f.name: joined([getattr(b, f.name) for b in batches]) for f in fields(batches[0])})


# --- probes ------------------------------------------------------------------------------------------


@dataclass
class ProbeSet:
    """One row's probe images, generated, not yet judged."""

    k: int
    row: str  # "SD" or "SD+TI"
    paths: list[list[str]]  # the neutral prompt's images, then each edit prompt's


class Prober:
    """Probes for the K runs of an Inversion.  `spec`: the judge, checked before training starts."""

    def __init__(self, inversion, spec):
        self.inv = inversion
        self.spec = spec
        self.train_embs: dict[tuple, torch.Tensor] = {}  # training images -> their embeddings
        self.text_embs: dict[tuple, torch.Tensor] = {}  # edit prompts -> theirs

    @staticmethod
    def judge_for(model):
        """The concept's judge: the demo CLIP on builtin:demo, OpenAI's ViT-B/32 on real models."""
        from engine.inversion.judge import default_clip, prepare_judge

        return prepare_judge(default_clip(model.info.spec))

    def prompts(self, k: int) -> list[str]:
        """Run k's templates: the neutral prompt, then the edit prompts (Table 1's)."""
        from engine.settings.prompts import edit_prompts, neutral_prompt

        prop = self.inv.slots[k].config.property
        return [neutral_prompt(prop), *edit_prompts(prop, self.inv.model.info.spec)]

    def generate(self, k: int, step: int | None) -> ProbeSet:
        """Run k's probe images (step None: the SD row, with the description for the word)."""
        from engine.settings.prompts import fill

        slot, cfg = self.inv.slots[k], self.inv.slots[k].config
        word = self.inv.words[k] if step is not None else (slot.description or cfg.init)
        counts = [cfg.probe_images] + [cfg.probe_edit_images] * (len(self.prompts(k)) - 1)
        pairs = [(fill(t, word), seed) for t, n in zip(self.prompts(k), counts) for seed in range(n)]
        images = self.inv.run_words.sample_pairs(k, pairs, cfg.probe_steps, GUIDANCE)  # a per-layer word too
        folder = slot.run_dir / PROBES_DIR / ("sd" if step is None else f"step-{step}")
        paths, it = [], iter(images)
        for i, n in enumerate(counts):
            name = "neutral" if i == 0 else f"edit-{i}"
            paths.append([_save(folder / f"{name}-{seed}.png", next(it)) for seed in range(n)])
        return ProbeSet(k, "SD" if step is None else "SD+TI", paths)

    def judge(self, sets: list[ProbeSet]) -> list[dict]:
        """The sets' scores: the judge built, every image embedded, the judge freed."""
        from engine.inversion.judge import judge
        from engine.inversion.metrics import editability_paper_per_prompt, reconstruction
        from engine.settings.prompts import without_placeholder
        from engine.store.images import load_image

        with judge(self.spec, self.inv.device) as clip:
            scores = []
            for s in sets:
                slot, prompts = self.inv.slots[s.k], self.prompts(s.k)
                key = tuple(map(str, slot.images))
                if key not in self.train_embs:
                    self.train_embs[key] = clip.images([load_image(p).convert("RGB") for p in slot.images])
                if tuple(prompts) not in self.text_embs:
                    self.text_embs[tuple(prompts)] = clip.texts([without_placeholder(p) for p in prompts[1:]])
                embs = [clip.images(paths) for paths in s.paths]
                per_prompt = editability_paper_per_prompt(embs[1:], self.text_embs[tuple(prompts)])
                scores.append({"reconstruction": reconstruction(embs[0], self.train_embs[key]),
                               "editability": sum(per_prompt) / len(per_prompt), "per_prompt": per_prompt})
        return scores

    def probe(self, ks: list[int], step: int | None) -> list[dict]:
        """Runs ks' probe events (step None: the SD row, at step 0: measured once for the runs of a
        batch that share it, the same concept's description, property and images; its images are
        kept in the first of those runs' folder)."""
        started = time.perf_counter()
        owners = {k: self._sd_key(k) if step is None else k for k in ks}
        first: dict = {}  # each owner's first run, whose folder keeps the images
        for k in ks:
            first.setdefault(owners[k], k)
        sets = [self.generate(k, step) for k in first.values()]
        measured = dict(zip(first, zip(sets, self.judge(sets))))  # owner -> (its set, its scores)
        seconds = (time.perf_counter() - started) / max(1, len(ks))
        return [{"type": "probe", "step": step or 0, "row": s.row, **score, "images": s.paths, "seconds": seconds}
                for s, score in (measured[owners[k]] for k in ks)]

    def _sd_key(self, k: int) -> tuple:
        slot = self.inv.slots[k]
        return (slot.description or slot.config.init, slot.config.property, tuple(map(str, slot.images)))


def judge_or_warning(model, needs_probes: bool) -> tuple[object | None, str | None]:
    """The probes' judge, or (None, why) when it cannot load: probes are then off with a warning,
    unless a stop rule reads them (`needs_probes`): then the run is refused before it starts."""
    try:
        return Prober.judge_for(model), None
    except UserError as exc:
        if needs_probes:
            raise UserError(f"--stop-when recon:X needs probes, and {exc}") from None
        return None, f"probes are off: {exc} (or train with --probe-every 0)"


# --- previews ----------------------------------------------------------------------------------------


@torch.no_grad()
def preview(inversion, step: int) -> None:
    """One image per live run from a fixed prompt and seed, saved as previews/step-N.png."""
    for k, slot in inversion.live():
        cfg = slot.config
        word = inversion.words[k]
        prompt = (cfg.preview_prompt or default_preview_prompt(cfg.property, "{token}")).replace(
            "{token}", word
        ).replace(cfg.token, word)
        image = inversion.run_words.sample(  # sample_prompt, once per layer for a per-layer word
            k, prompt, seeds=[cfg.preview_seed], steps=cfg.preview_steps, guidance=7.5,
        )[0]
        path = _save(slot.run_dir / "previews" / f"step-{step}.png", image)
        slot.reporter.emit("preview", step=step, path=path, prompt=prompt.replace(word, cfg.token))


def _save(path: Path, image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return str(path)
