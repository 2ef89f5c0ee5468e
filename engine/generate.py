"""Prompts -> images.  (Sampling core; the full generation job builds on it.)"""

from __future__ import annotations

import torch


def generation_scheduler(model, name: str = "dpm++"):
    """DPM-Solver++ (multistep) built from the model's own noise schedule."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler.from_config(model.pipe.scheduler.config, algorithm_type="dpmsolver++")


def _pipeline_with(model, scheduler):
    from diffusers import StableDiffusionPipeline

    components = dict(model.pipe.components)
    components["scheduler"] = scheduler
    pipe = StableDiffusionPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def sample_images(model, prompt_embeds: torch.Tensor, seeds: list[int], steps: int = 25, guidance: float = 7.5,
                  negative_prompt: str = "", resolution: int | None = None):
    """One image per seed from precomputed prompt embeddings ([1 or N, 77, dim])."""
    pipe = _pipeline_with(model, generation_scheduler(model))
    if prompt_embeds.shape[0] == 1 and len(seeds) > 1:
        prompt_embeds = prompt_embeds.expand(len(seeds), -1, -1)
    gens = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
    size = resolution or model.info.resolution
    return pipe(
        prompt_embeds=prompt_embeds.to(model.dtype), negative_prompt=[negative_prompt] * len(seeds),
        num_inference_steps=steps, guidance_scale=guidance, generator=gens, height=size, width=size,
        output_type="pil",
    ).images
