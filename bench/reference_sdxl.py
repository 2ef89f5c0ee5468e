"""A faithful reproduction of the per-step work of diffusers' textual_inversion_sdxl.py example.

The SDXL baseline our training step is measured against (bench/run.py picks it for
SDXL models).  What it does each step, as the example does:
  * the dataset item: a PIL image resized (bicubic) to the resolution and flipped
    (p=0.5); its original size and crop offset (0, 0: the resize leaves nothing to
    crop) become add_time_ids; the template is tokenized by BOTH tokenizers, per step;
  * the VAE encodes the image every step, in the frozen dtype, and samples the posterior;
  * both text encoders run with output_hidden_states: penultimate states concatenated,
    encoder 2's pooled projection (`encoder_output_2[0]`) as text_embeds;
  * both WHOLE token tables go to one AdamW (weight decay 1e-2), and after the step
    every row but the new one is copied back in each table;
  * mixed precision uses a GradScaler, which syncs with the host every step.

One deviation, needed to run at all: the example casts text_encoder_2 to fp16 while
optimizing its token table, which GradScaler refuses ("Attempting to unscale FP16
gradients"); here that one table stays fp32 (the rest of encoder 2 is fp16), as a
working fp16 run of the example must do.  Encoder 1 is fp32 under fp16 autocast, as
in the example.
"""

from __future__ import annotations

import copy
import random

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from engine.inversion.data import OBJECT_TEMPLATES


class ReferenceLoopSDXL:
    def __init__(self, model, images: list[Image.Image], token: str = "<ref>", init: str = "cat",
                 lr: float = 5e-4, seed: int = 0):
        self.model = model
        self.device = model.device
        self.weight_dtype = model.dtype
        self.resolution = model.info.resolution
        self.images = images
        self.rng = random.Random(seed)
        self.token = token
        self.use_amp = self.device.type == "cuda" and self.weight_dtype == torch.float16
        self.tokenizers, self.encoders, self.no_update, self.originals = [], [], [], []
        for e, (encoder, tokenizer) in enumerate(model.encoders):
            tokenizer = copy.deepcopy(tokenizer)
            tokenizer.add_tokens([token])
            token_id = tokenizer.convert_tokens_to_ids(token)
            init_id = tokenizer(init, add_special_tokens=False).input_ids[0]
            # encoder 1 stays fp32 (trained under autocast); encoder 2 is cast to the frozen dtype
            encoder = copy.deepcopy(encoder).to(torch.float32 if e == 0 else self.weight_dtype)
            encoder.resize_token_embeddings(len(tokenizer))
            table = encoder.get_input_embeddings()
            table.to(torch.float32)  # the trained table must be fp32 for GradScaler (see above)
            with torch.no_grad():
                table.weight[token_id] = table.weight[init_id].clone()
            encoder.requires_grad_(False)
            table.requires_grad_(True)
            encoder.train()
            keep = torch.ones(len(tokenizer), dtype=torch.bool, device=self.device)
            keep[token_id] = False
            self.tokenizers.append(tokenizer)
            self.encoders.append(encoder)
            self.no_update.append(keep)
            self.originals.append(table.weight.detach().clone())
        self.optimizer = torch.optim.AdamW([enc.get_input_embeddings().weight for enc in self.encoders], lr=lr,
                                           betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
        self.scheduler = model.noise_scheduler()
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)

    def _example(self):
        image = self.rng.choice(self.images).convert("RGB")
        original_size = (image.height, image.width)
        image = image.resize((self.resolution, self.resolution), Image.Resampling.BICUBIC)
        crop_top_left = (0, 0)
        if self.rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
        text = self.rng.choice(OBJECT_TEMPLATES).format(self.token)
        ids = [tok(text, padding="max_length", truncation=True, max_length=tok.model_max_length,
                   return_tensors="pt").input_ids for tok in self.tokenizers]
        return pixels[None], ids, original_size, crop_top_left

    def step(self) -> torch.Tensor:
        pixels, ids, original_size, crop_top_left = self._example()
        pixels, ids = pixels.to(self.device), [i.to(self.device) for i in ids]
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.use_amp):
            latents = self.model.vae.encode(pixels.to(self.weight_dtype)).latent_dist.sample().detach()
            latents = latents * self.model.vae.config.scaling_factor
            noise = torch.randn_like(latents)
            t = torch.randint(0, self.scheduler.config.num_train_timesteps, (1,), device=self.device).long()
            noisy = self.scheduler.add_noise(latents, noise, t)
            hidden_1 = self.encoders[0](ids[0], output_hidden_states=True).hidden_states[-2].to(self.weight_dtype)
            output_2 = self.encoders[1](ids[1], output_hidden_states=True)
            hidden_2 = output_2.hidden_states[-2].to(self.weight_dtype)
            target_size = (self.resolution, self.resolution)
            time_ids = torch.tensor([original_size + crop_top_left + target_size]).to(self.device, self.weight_dtype)
            added = {"text_embeds": output_2[0], "time_ids": time_ids}
            hidden = torch.cat([hidden_1, hidden_2], dim=-1)
            pred = self.model.unet(noisy, t, hidden, added_cond_kwargs=added).sample
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
            for encoder, keep, original in zip(self.encoders, self.no_update, self.originals):
                table = encoder.get_input_embeddings().weight
                table[keep] = original[keep]
        return loss.detach()
