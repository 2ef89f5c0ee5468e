"""Test helper: write a diffusers pipeline as a single-file checkpoint in the ORIGINAL layout.

Real SD 1.x files hold `model.diffusion_model.*` (the LDM UNet), `first_stage_model.*`
(the VAE) and `cond_stage_model.transformer.text_model.*` (CLIP ViT-L); SD 2.x holds
`cond_stage_model.model.*` (OpenCLIP: fused q/k/v, `resblocks`, `ln_final`); SDXL holds
`conditioner.embedders.0.transformer.text_model.*` (CLIP ViT-L) and
`conditioner.embedders.1.model.*` (OpenCLIP bigG with its `text_projection`).

diffusers' convert_diffusers_to_original_* scripts write the wrong text-encoder keys
under transformers 5 (no `text_model.`), so this is our own, written from the layouts.
"""

from __future__ import annotations

import torch


def _resnet(key: str) -> str:
    for new, old in (("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("out_layers.0", "norm2"),
                     ("out_layers.3", "conv2"), ("emb_layers.1", "time_emb_proj"),
                     ("skip_connection", "conv_shortcut")):
        key = key.replace(f".{old}.", f".{new}.")
    return key


def unet_to_ldm(state: dict, config: dict) -> dict:
    """diffusers UNet2DConditionModel keys -> `model.diffusion_model.*` (LDM openaimodel names)."""
    n = config["layers_per_block"]
    up_has_attention = ["CrossAttn" in t for t in config["up_block_types"]]
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        module, _, leaf = key.rpartition(".")
        if module in fixed:
            ldm = f"{fixed[module]}.{leaf}"
        elif parts[0] == "down_blocks":
            i, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
            if kind == "downsamplers":
                ldm = f"input_blocks.{(n + 1) * (i + 1)}.0.op." + ".".join(parts[5:])
            else:
                ldm = f"input_blocks.{(n + 1) * i + j + 1}.{0 if kind == 'resnets' else 1}.{rest}"
        elif parts[0] == "mid_block":
            index = {"resnets.0": 0, "attentions.0": 1, "resnets.1": 2}[f"{parts[1]}.{parts[2]}"]
            ldm = f"middle_block.{index}." + ".".join(parts[3:])
        elif parts[0] == "up_blocks":
            i, kind, j = int(parts[1]), parts[2], int(parts[3])
            if kind == "upsamplers":
                ldm = f"output_blocks.{(n + 1) * i + n}.{2 if up_has_attention[i] else 1}." + ".".join(parts[4:])
            else:
                ldm = f"output_blocks.{(n + 1) * i + j}.{0 if kind == 'resnets' else 1}." + ".".join(parts[4:])
        else:
            raise KeyError(f"no LDM name for UNet key {key}")
        out["model.diffusion_model." + _resnet("." + ldm)[1:]] = value
    return out


def vae_to_ldm(state: dict, config: dict) -> dict:
    """diffusers AutoencoderKL keys -> `first_stage_model.*` (LDM names; attention as 1x1 convs)."""
    levels = len(config["block_out_channels"])
    out = {}
    for key, value in state.items():
        ldm = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        for i in range(levels):
            ldm = ldm.replace(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block.")
            ldm = ldm.replace(f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.")
            ldm = ldm.replace(f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{levels - 1 - i}.block.")
            ldm = ldm.replace(f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{levels - 1 - i}.upsample.")
        ldm = ldm.replace("mid_block.resnets.0.", "mid.block_1.").replace("mid_block.resnets.1.", "mid.block_2.")
        if "mid_block.attentions.0." in ldm:
            ldm = ldm.replace("mid_block.attentions.0.", "mid.attn_1.")
            for old, new in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"),
                             ("to_out.0", "proj_out")):
                ldm = ldm.replace(f".{old}.", f".{new}.")
            if value.dim() == 2:
                value = value[:, :, None, None]
        out["first_stage_model." + ldm] = value
    return out


def clip_to_ldm(state: dict, prefix: str) -> dict:
    """transformers 5 CLIPTextModel keys (flattened: no `text_model.`) -> `<prefix>text_model.*`."""
    return {prefix + "text_model." + k: v for k, v in state.items() if not k.startswith("text_projection")}


def openclip_to_ldm(state: dict, prefix: str) -> dict:
    """CLIPTextModel(WithProjection) keys -> OpenCLIP's `<prefix>*`: fused in_proj, resblocks, ln_final."""
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    out = {
        prefix + "token_embedding.weight": state["embeddings.token_embedding.weight"],
        prefix + "positional_embedding": state["embeddings.position_embedding.weight"],
        prefix + "ln_final.weight": state["final_layer_norm.weight"],
        prefix + "ln_final.bias": state["final_layer_norm.bias"],
    }
    if "text_projection.weight" in state:
        out[prefix + "text_projection"] = state["text_projection.weight"].T.contiguous()
    layers = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.layers.")})
    for i in layers:
        src, dst = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[dst + f"attn.in_proj_{kind}"] = torch.cat(
                [state[src + f"self_attn.{p}_proj.{kind}"] for p in ("q", "k", "v")])
            out[dst + f"attn.out_proj.{kind}"] = state[src + f"self_attn.out_proj.{kind}"]
            out[dst + f"ln_1.{kind}"] = state[src + f"layer_norm1.{kind}"]
            out[dst + f"ln_2.{kind}"] = state[src + f"layer_norm2.{kind}"]
            out[dst + f"mlp.c_fc.{kind}"] = state[src + f"mlp.fc1.{kind}"]
            out[dst + f"mlp.c_proj.{kind}"] = state[src + f"mlp.fc2.{kind}"]
    return out


def pipeline_to_single_file(pipe, family: str) -> dict:
    """The whole pipeline as one original-layout state dict (what a .safetensors checkpoint holds)."""
    sd = {}
    sd.update(unet_to_ldm(pipe.unet.state_dict(), dict(pipe.unet.config)))
    sd.update(vae_to_ldm(pipe.vae.state_dict(), dict(pipe.vae.config)))
    text = pipe.text_encoder.state_dict()
    if family == "sd1":
        sd.update(clip_to_ldm(text, "cond_stage_model.transformer."))
    elif family == "sd2":
        sd.update(openclip_to_ldm(text, "cond_stage_model.model."))
    else:
        sd.update(clip_to_ldm(text, "conditioner.embedders.0.transformer."))
        sd.update(openclip_to_ldm(pipe.text_encoder_2.state_dict(), "conditioner.embedders.1.model."))
    return {k: v.contiguous() for k, v in sd.items()}
