"""`--ema DECAY`: an exponential moving average of the trained vectors, the word a run saves.

OneTrainer's schedule (modules/module/EMAModule.py): after optimizer step t (0-based) the
average moves toward the vectors by 1 - d_t with d_t = min(DECAY, (1 + t) / (10 + t)), so
early steps, whose average would otherwise sit on the initializer, are not averaged away.
One row per run (K runs batched keep K averages); checkpoints store it, so a resume
continues it exactly.  The saved steps, the final embedding and the previews show the
average; the loss, the optimizer and the logged norms see the vectors trained.
"""

from __future__ import annotations

import contextlib

import torch


class WordEMA:
    def __init__(self, decay: float, vectors: torch.Tensor):
        self.decay = float(decay)
        self.rows = vectors.detach().clone()  # [K, P] fp32, where the vectors start

    def rate(self, step: int) -> float:
        """1 - d_t: how far the average moves after optimizer step `step` (0-based)."""
        return 1.0 - min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, vectors: torch.Tensor, step: int) -> None:
        self.rows.add_((vectors.detach() - self.rows) * self.rate(step))

    @contextlib.contextmanager
    def shown(self, vectors: torch.Tensor):
        """The average in place of the vectors for a while (a preview), then the vectors back,
        bit for bit (they are copied aside, not recomputed)."""
        kept = vectors.detach().clone()
        with torch.no_grad():
            vectors.copy_(self.rows)
        try:
            yield
        finally:
            with torch.no_grad():
                vectors.copy_(kept)
