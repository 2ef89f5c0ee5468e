"""AdamW for a few trainable rows, with fp16 overflow skipping and no host sync.

Why not `torch.optim.AdamW` + `GradScaler`?  GradScaler reads `found_inf` on
the host every step (a sync that stalls a launch-bound GPU loop), and a
skipped step must skip per run when K runs share a batch.  AdamW is
elementwise, so treating each row with its own step count and skip mask
makes K rows exactly K independent optimizers.

Loss scaling is on for a row while its `scaling` flag is: the run's dtype decides it
(fp16 needs it; fp32 and bf16 do not), never the scale's value, so a run resumed in
another precision than it started in scales as its new dtype needs (`use_scaling`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FP16_SCALE = 2.0**16  # the first loss scale of an fp16 run (GradScaler's default too)


@dataclass
class RowAdamW:
    lr: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-2

    def init_state(self, params: torch.Tensor, scaling: bool = False) -> dict[str, torch.Tensor]:
        """Fresh state for every row of `params`; `scaling`: dynamic loss scaling (fp16)."""
        rows = params.shape[0]
        return {
            "exp_avg": torch.zeros_like(params),
            "exp_avg_sq": torch.zeros_like(params),
            "step": torch.zeros(rows, device=params.device, dtype=torch.float32),
            "loss_scale": torch.full((rows,), FP16_SCALE if scaling else 1.0, device=params.device),
            "scaling": torch.full((rows,), scaling, dtype=torch.bool, device=params.device),
            "good_steps": torch.zeros(rows, device=params.device, dtype=torch.float32),
            "skipped": torch.zeros(rows, device=params.device, dtype=torch.float32),
        }

    @torch.no_grad()
    def step(self, params: torch.Tensor, grad: torch.Tensor, state: dict, lr: float | torch.Tensor) -> None:
        """One update of every row; rows whose (unscaled) grad is not finite are skipped."""
        scale = state["loss_scale"].unsqueeze(1)
        grad = grad / scale
        ok = torch.isfinite(grad).all(dim=1)  # [K]
        okc = ok.unsqueeze(1)
        grad = torch.where(okc, grad, torch.zeros_like(grad))
        step = state["step"] + ok.float()
        b1, b2 = self.betas
        exp_avg = torch.where(okc, state["exp_avg"] * b1 + grad * (1 - b1), state["exp_avg"])
        exp_avg_sq = torch.where(okc, state["exp_avg_sq"] * b2 + grad * grad * (1 - b2), state["exp_avg_sq"])
        safe_step = step.clamp(min=1).unsqueeze(1)
        bias1 = 1 - b1**safe_step
        bias2 = 1 - b2**safe_step
        update = (exp_avg / bias1) / ((exp_avg_sq / bias2).sqrt() + self.eps)
        new = params * (1 - lr * self.weight_decay) - lr * update
        params.copy_(torch.where(okc, new, params))
        state.update(exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, step=step)
        self._update_scale(state, ok)

    @staticmethod
    def use_scaling(state: dict, scaling: bool) -> None:
        """Make every row scale (or not) as this run's dtype needs, after a resume.  A row
        restored from a run in another precision starts over: 2**16 in fp16 (a run begun in
        fp32 or bf16, or on a CPU, saved a scale of 1), 1 otherwise; a row that agrees keeps
        its scale and good-step count, so a resume in the same dtype stays exact."""
        wanted = torch.full_like(state["scaling"], scaling)
        changed = state["scaling"] != wanted
        fresh = torch.full_like(state["loss_scale"], FP16_SCALE if scaling else 1.0)
        state["loss_scale"] = torch.where(changed, fresh, state["loss_scale"])
        state["good_steps"] = torch.where(changed, torch.zeros_like(state["good_steps"]), state["good_steps"])
        state["scaling"] = wanted

    @staticmethod
    def _update_scale(state: dict, ok: torch.Tensor) -> None:
        """Dynamic loss scaling, on rows whose `scaling` flag is set (fp16): halve on overflow
        (never below 2), double after 2000 good steps.  Other rows keep a scale of 1."""
        dynamic = state["scaling"]
        good = torch.where(ok, state["good_steps"] + 1, torch.zeros_like(state["good_steps"]))
        grow = dynamic & (good >= 2000)
        scale = torch.where(dynamic & ~ok, (state["loss_scale"] * 0.5).clamp(min=2.0), state["loss_scale"])
        state["loss_scale"] = torch.where(grow, scale * 2, scale)
        state["good_steps"] = torch.where(grow, torch.zeros_like(good), good)
        state["skipped"] = state["skipped"] + (~ok).float()
