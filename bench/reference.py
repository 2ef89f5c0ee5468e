"""A faithful reproduction of the per-step work of diffusers' textual_inversion.py example.

This is the baseline our training step is measured against (bench/run.py).
What it does each step, as the example does:
  * the dataset item: a PIL image resized (bicubic) and flipped (p=0.5), the
    prompt template tokenized, per step;
  * the VAE encodes the image every step and samples the posterior;
  * the text encoder is fp32 (under fp16 autocast on CUDA) with a resized token
    table, and the WHOLE table goes to AdamW (weight decay 1e-2);
  * after the step every row but the new one is copied back from a saved copy;
  * mixed precision uses a GradScaler, which syncs with the host every step.
"""

from __future__ import annotations

import copy
import random

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from engine.inversion.data import OBJECT_TEMPLATES


class ReferenceLoop:
    def __init__(self, model, images: list[Image.Image], token: str = "<ref>", init: str = "cat",
                 lr: float = 5e-4, seed: int = 0):
        self.model = model
        self.device = model.device
        self.weight_dtype = model.dtype
        self.resolution = model.info.resolution
        self.images = images
        self.rng = random.Random(seed)
        self.tokenizer = copy.deepcopy(model.tokenizer)
        self.tokenizer.add_tokens([token])
        self.token = token
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        init_id = self.tokenizer(init, add_special_tokens=False).input_ids[0]
        # the example keeps the text encoder in fp32 and resizes its token table
        self.text_encoder = copy.deepcopy(model.text_encoder).to(torch.float32)
        self.text_encoder.resize_token_embeddings(len(self.tokenizer))
        table = self.text_encoder.get_input_embeddings().weight
        with torch.no_grad():
            table[token_id] = table[init_id].clone()
        self.text_encoder.requires_grad_(False)
        self.text_encoder.get_input_embeddings().requires_grad_(True)
        self.text_encoder.train()
        self.optimizer = torch.optim.AdamW(self.text_encoder.get_input_embeddings().parameters(), lr=lr,
                                           betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
        self.orig_embeds = table.detach().clone()
        self.no_update = torch.ones(len(self.tokenizer), dtype=torch.bool, device=self.device)
        self.no_update[token_id] = False
        self.scheduler = model.noise_scheduler()
        self.use_amp = self.device.type == "cuda" and self.weight_dtype == torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)

    def _example(self) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.rng.choice(self.images).convert("RGB")
        image = image.resize((self.resolution, self.resolution), Image.Resampling.BICUBIC)
        if self.rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
        text = self.rng.choice(OBJECT_TEMPLATES).format(self.token)
        ids = self.tokenizer(text, padding="max_length", truncation=True,
                             max_length=self.tokenizer.model_max_length, return_tensors="pt").input_ids
        return pixels[None], ids

    def step(self) -> torch.Tensor:
        pixels, ids = self._example()
        pixels, ids = pixels.to(self.device), ids.to(self.device)
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.use_amp):
            latents = self.model.vae.encode(pixels.to(self.weight_dtype)).latent_dist.sample().detach()
            latents = latents * self.model.vae.config.scaling_factor
            noise = torch.randn_like(latents)
            t = torch.randint(0, self.scheduler.config.num_train_timesteps, (1,), device=self.device).long()
            noisy = self.scheduler.add_noise(latents, noise, t)
            hidden = self.text_encoder(ids)[0].to(dtype=self.weight_dtype)
            pred = self.model.unet(noisy, t, hidden).sample
            if self.scheduler.config.prediction_type == "v_prediction":
                target = self.scheduler.get_velocity(latents, noise, t)
            else:
                target = noise
            loss = F.mse_loss(pred.float(), target.float(), reduction="mean")
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad()
        with torch.no_grad():
            table = self.text_encoder.get_input_embeddings().weight
            table[self.no_update] = self.orig_embeds[self.no_update]
        return loss.detach()
