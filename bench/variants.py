"""The benchmark's variants: what each measures, on which model, in what order, for how long at most.

This table is the plan; bench/measure.py does the measuring, one subprocess per variant
(bench/run.py starts them).  It imports nothing heavy, so the runner plans without torch.
Cheap variants come first and the torch.compile ones last: a session that runs out of
time, or a compile that breaks, loses the least.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Model roles -> the spec each device kind measures.  A spec the engine does not know is
# recorded as skipped, so an older engine still benchmarks the rest.
MODELS = {
    "main": {"cuda": "builtin:sd15-arch", "cpu": "builtin:tiny"},
    "sdxl": {"cuda": "builtin:sdxl-arch", "cpu": "builtin:sdxl-tiny"},
    "sdxl-tiny": {"cuda": "builtin:sdxl-tiny", "cpu": "builtin:sdxl-tiny"},  # a mechanism, not a speed
}

# The whole run's default time budget on a GPU: the device tool lends 15 minutes in all,
# a machine takes one or two to start, and a rerun of one variant should still fit.
CUDA_BUDGET_S = 465


@dataclass(frozen=True)
class Variant:
    name: str
    measure: str  # a function of bench/measure.py (its MEASURES): train_step, reference, syncs, compiled …
    what: str
    timeout_s: int  # its limit on a GPU (the budget may cut it shorter)
    cpu_timeout_s: int = 300
    model: str = "main"  # a key of MODELS
    params: dict = field(default_factory=dict)
    ratio: str | None = None  # "speedup": ours / this; "vs_ours": this / ours (run-steps/s where batched)
    against: str = "ours"  # the variant whose line is "ours" for the ratio


VARIANTS = (
    Variant("ours", "train_step", "our training step, batch 1", 90),
    Variant("reference", "reference", "the diffusers example's step (bench/reference.py)", 120, ratio="speedup"),
    Variant("syncs", "syncs", "host synchronisations per step, ours and the reference", 90),
    Variant("sync-error", "sync_error", "one step of ours under sync debug mode 'error' (ok: nothing synced)", 60),
    Variant("resume-fp16", "resume_fp16", "fp32 -> fp16 resume: the loss scale; a resume vs the uninterrupted run, "
            "with and without --deterministic", 120),
    Variant("engine-fork", "engine_fork", "a train job through the engine on this GPU, its worker killed with "
            "kill -9, a second job on a worker the zygote forks, the first resumed: fork used? each job's end", 120),
    Variant("low-vram", "train_step", "ours with gradient checkpointing (--low-vram)", 90,
            params={"low_vram": True}, ratio="vs_ours"),
    Variant("per-layer", "train_step", "ours with a word per UNet cross-attention layer (--per-layer, P+: "
            "16 text-encoder passes a step on SD 1.5)", 120, params={"per_layer": True}, ratio="vs_ours"),
    Variant("generation", "generation", "images/s: 25 DPM-Solver++ steps with CFG", 90),
    Variant("sdxl-decode-error", "sdxl_decode_error", "an OOM injected into an fp16 SDXL decode, then a second "
            "generation: the VAE's dtype after, and whether the second worked", 60, model="sdxl-tiny"),
    Variant("batched-8", "train_step", "a sweep of 8 runs sharing each UNet call", 120, params={"k": 8},
            ratio="vs_ours"),
    Variant("batched-16", "train_step", "a sweep of 16 runs sharing each UNet call", 150, params={"k": 16},
            ratio="vs_ours"),
    Variant("table1", "table1", "wall time of a Table-1 evaluation (2 rows x 4 sets, CLIP scores)", 150),
    Variant("probes", "watched", "ours with probes (every 500) and the deterministic loss (every 25) at their "
            "defaults: a 2000-step run's steps/s, from each part's time", 150, ratio="vs_ours"),
    Variant("sdxl", "train_step", "our training step at SDXL's shapes", 180, cpu_timeout_s=300, model="sdxl"),
    Variant("sdxl-reference", "reference", "diffusers' textual_inversion_sdxl.py step (bench/reference_sdxl.py)",
            180, cpu_timeout_s=300, model="sdxl", ratio="speedup", against="sdxl"),
    Variant("sdxl-vae-memory", "sdxl_vae_memory", "peak memory of SDXL's VAE encoding and decoding at 1024 px "
            "with engine.sd.vae's sizes, beside its estimate (a CPU: the sizes only)", 150, model="sdxl"),
    Variant("compile-reduce-overhead", "compiled", "torch.compile mode reduce-overhead (CUDA graphs)", 200,
            cpu_timeout_s=600, params={"mode": "reduce-overhead"}, ratio="vs_ours"),
    Variant("compile-default", "compiled", "torch.compile default mode", 200, cpu_timeout_s=600,
            params={"mode": "default"}, ratio="vs_ours"),
)

BY_NAME = {v.name: v for v in VARIANTS}


def select(only: str | None, skip: str | None) -> list[Variant]:
    """The variants named by --only (default: all) less those named by --skip, in plan order."""
    def names(text: str | None) -> set[str]:
        chosen = {n.strip() for n in (text or "").split(",") if n.strip()}
        unknown = chosen - set(BY_NAME)
        if unknown:
            raise ValueError(f"unknown variant(s) {', '.join(sorted(unknown))}; choose from {', '.join(BY_NAME)}")
        return chosen

    keep, drop = names(only) or set(BY_NAME), names(skip)
    return [v for v in VARIANTS if v.name in keep and v.name not in drop]
