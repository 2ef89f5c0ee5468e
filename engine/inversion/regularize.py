"""Keeping a learned word editable: regularisers that sit beside the optimizer, per run row.

The study found the trade-off: a learned word reconstructs its concept better and
obeys the rest of the prompt worse, and the vector's norm grows far past the
vocabulary's (Pang et al. 2023 report up to 100x).  Each method acts on one run's
row of the [K, P] trained matrix, so a batched sweep can mix methods and every row
still ends where its solo run ends:

  none         the paper's inversion
  init-l2      loss += w * mean over vectors of |v - v_init|^2   (the cross-initialisation idea)
  norm         loss += w * mean over vectors of relu(|v| - tau)^2, tau = the vocabulary's median norm
  directional  the norm stays |v_init|; only the direction is learned (Directional TI): the
               gradient is projected onto the sphere's tangent, and each step ends on the sphere
  cross        (--init-mode cross) loss += w * mean over vectors of |v - v_init|, NOT squared, with
               v_init the cross-initialised start (Pang et al. 2024, their code: pairwise_distance,
               eps 1e-6, w 1e-5); it adds to any of the above

A per-layer word's L x N vectors are all "its vectors" here: each term averages over them.

Nothing here keeps state of its own: the initial rows are rebuilt the same way on resume,
so resume stays bit-exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.sd.placeholder import WordLayout

# Strengths used when none is given (--reg-weight 0, no METHOD:W), measured on builtin:demo's
# mushroom (demo/logs/regularize-mushroom.json; README: "Keeping a word editable"): init-l2 at
# 0.003 trades 0.017 of reconstruction for 0.027 of editability, 0.01 already gives back most of
# what the word learned.  Another model's loss has another scale: sweep it there
# (`tistudio experiment regularize NAME --methods none,init-l2:0.001,init-l2:0.01`).
DEFAULT_WEIGHTS = {"init-l2": 0.003, "norm": 1.0}
COLUMNS = (*DEFAULT_WEIGHTS, "cross")  # the column of each weighted term in Regularizer.weights


@dataclass
class Regularizer:
    layout: WordLayout
    init_rows: torch.Tensor  # [K, P] fp32: where each run started
    weights: torch.Tensor  # [K, 3]: the init-l2, norm and cross strengths of each row (0: off)
    directional: torch.Tensor  # [K] bool
    vocab_norms: list[float]  # tau per encoder: the median norm of its token table

    @classmethod
    def build(cls, layout: WordLayout, init_rows: torch.Tensor, configs, encoders) -> "Regularizer | None":
        """The regulariser of K runs, or None when every run is the paper's plain inversion."""
        methods = [c.regularize for c in configs]
        cross = [c.init_mode == "cross" and c.cross_weight > 0 for c in configs]
        if all(m == "none" for m in methods) and not any(cross):
            return None
        weights = torch.zeros(len(configs), len(COLUMNS), device=init_rows.device)
        for k, c in enumerate(configs):
            if c.regularize in DEFAULT_WEIGHTS:
                weights[k, COLUMNS.index(c.regularize)] = c.reg_weight or DEFAULT_WEIGHTS[c.regularize]
            if cross[k]:
                weights[k, COLUMNS.index("cross")] = c.cross_weight
        directional = torch.tensor([m == "directional" for m in methods], device=init_rows.device)
        return cls(layout, init_rows.detach().clone(), weights, directional, vocab_norms(encoders))

    # --- a term of the loss -------------------------------------------------------------------

    def penalty(self, rows: torch.Tensor) -> torch.Tensor:
        """[K] differentiable penalty (init-l2, norm and cross rows; 0 elsewhere)."""
        pull = torch.zeros(rows.shape[0], device=rows.device)
        excess, distance = torch.zeros_like(pull), torch.zeros_like(pull)
        for e, tau in enumerate(self.vocab_norms):
            v, v0 = self._vectors(rows, e), self._vectors(self.init_rows, e)
            pull = pull + (v - v0).pow(2).sum(-1).mean(-1)
            excess = excess + torch.relu(v.norm(dim=-1) - tau).pow(2).mean(-1)
            # Pang et al.'s term as their code has it: the distance itself (eps keeps its gradient finite at 0).
            distance = distance + torch.nn.functional.pairwise_distance(v, v0, p=2, eps=1e-6).mean(-1)
        return self.weights[:, 0] * pull + self.weights[:, 1] * excess + self.weights[:, 2] * distance

    # --- a change of the update (directional) ---------------------------------------------------

    def project(self, rows: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """The gradient with each directional vector's radial part removed."""
        parts = []
        for e in range(len(self.vocab_norms)):
            v, g = self._vectors(rows, e), self._vectors(grad, e)
            unit = v / v.norm(dim=-1, keepdim=True).clamp(min=1e-12)
            parts.append(g - (g * unit).sum(-1, keepdim=True) * unit)
        projected = self._rows(parts)
        return torch.where(self.directional.unsqueeze(1), projected, grad)

    @torch.no_grad()
    def renormalize(self, rows: torch.Tensor) -> None:
        """Put each directional vector back on its sphere (radius: its initializer's norm)."""
        parts = []
        for e in range(len(self.vocab_norms)):
            v, v0 = self._vectors(rows, e), self._vectors(self.init_rows, e)
            radius = v0.norm(dim=-1, keepdim=True)
            parts.append(v * (radius / v.norm(dim=-1, keepdim=True).clamp(min=1e-12)))
        rows.copy_(torch.where(self.directional.unsqueeze(1), self._rows(parts), rows))

    # --- views ------------------------------------------------------------------------------

    def _vectors(self, rows: torch.Tensor, e: int) -> torch.Tensor:
        """[K, P] -> encoder e's vectors as [K, L*n, width] (a plain word: L = 1)."""
        return self.layout.block(rows, e).view(rows.shape[0], self.layout.rows, -1)

    def _rows(self, parts: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([p.reshape(p.shape[0], -1) for p in parts], dim=1)


def vocab_norms(encoders) -> list[float]:
    """The median norm of each text encoder's token table: the vocabulary's typical word."""
    return [float(encoder.get_input_embeddings().weight.detach().float().norm(dim=-1).median())
            for encoder, _ in encoders]


@torch.no_grad()
def vector_figures(layout: WordLayout, rows: torch.Tensor, init_rows: torch.Tensor) -> list[dict]:
    """Per run: the mean norm of its vectors and their mean cosine to where they started, per encoder."""
    figures = []
    for k in range(rows.shape[0]):
        now, start = layout.split(rows[k].float()), layout.split(init_rows[k].float())
        norms = [float(b.norm(dim=-1).mean()) for b in now]
        cosines = [float(torch.nn.functional.cosine_similarity(b, s, dim=-1).mean()) for b, s in zip(now, start)]
        figures.append({"norm": norms[0], "cos_init": cosines[0], "norms": norms, "cos_inits": cosines})
    return figures
