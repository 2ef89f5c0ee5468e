"""`builtin:demo`: a miniature text-to-image model and its judge, trained by this project.

Not Stable Diffusion: a small model trained on the procedural world in
`demo/world.py` (32x32 pictures of shapes, toys and painting styles), so that an
inversion on a laptop CPU gives meaningful pictures and numbers.  It has SD's
component classes, so every engine path runs unchanged:

  text_encoder  transformers.CLIPTextModel  = the small CLIP's text tower (weights shared)
  tokenizer     the real CLIP tokenizer (engine.sd.tokenizer)
  vae           diffusers.AutoencoderKL, 32x32x3 <-> 16x16x4
  unet          diffusers.UNet2DConditionModel on the 16x16x4 latents
  scheduler     diffusers.DDPMScheduler (SD 1.x's schedule, epsilon prediction)

The judge is an open_clip `CLIP` built from `demo_weights/clip_config.json`, so
metrics run through open_clip unchanged.  Weights are stored in fp16 in
`engine/sd/demo_weights/` and run in fp32 (or whatever dtype the caller moves
them to).  How they were trained: demo/README.md.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

HERE = Path(__file__).parent
WEIGHTS = HERE / "demo_weights"
CONFIGS = HERE / "configs" / "demo"
CLIP_CONFIG = WEIGHTS / "clip_config.json"
CLIP_WEIGHTS = WEIGHTS / "clip.safetensors"
UNET_WEIGHTS = WEIGHTS / "unet.safetensors"
VAE_WEIGHTS = WEIGHTS / "vae.safetensors"
# The judge's image normalisation (the world's pixels mapped to [-1, 1]).
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)
RESOLUTION = 32


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def weights_present() -> bool:
    return all(p.is_file() for p in (CLIP_CONFIG, CLIP_WEIGHTS, UNET_WEIGHTS, VAE_WEIGHTS))


def _require_weights(*paths: Path) -> None:
    if not all(p.is_file() for p in (paths or (CLIP_CONFIG, CLIP_WEIGHTS, UNET_WEIGHTS, VAE_WEIGHTS))):
        from engine.errors import UserError

        raise UserError(
            f"the builtin:demo weights are missing from {WEIGHTS}; rebuild them with demo/README.md's recipe"
        )


# --- the judge: open_clip CLIP -------------------------------------------------------------------


def clip_config() -> dict:
    return _read_json(CLIP_CONFIG)


def build_clip(config: dict | None = None):
    """An open_clip CLIP with the demo architecture and fresh (random) weights."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    cfg = config or clip_config()
    return CLIP(
        embed_dim=cfg["embed_dim"],
        vision_cfg=CLIPVisionCfg(**cfg["vision_cfg"]),
        text_cfg=CLIPTextCfg(**cfg["text_cfg"]),
        quick_gelu=cfg.get("quick_gelu", False),
    )


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v.float() for k, v in load_file(str(path)).items()}


@functools.lru_cache(maxsize=1)
def _clip_state() -> dict[str, torch.Tensor]:
    _require_weights(CLIP_CONFIG, CLIP_WEIGHTS)
    return _load_safetensors(CLIP_WEIGHTS)


def clip_preprocess():
    from open_clip.transform import image_transform

    return image_transform(RESOLUTION, is_train=False, mean=IMAGE_MEAN, std=IMAGE_STD)


def load_demo_clip(device: str | torch.device = "cpu"):
    """(model, preprocess, tokenizer), as `open_clip.create_model_and_transforms` + `get_tokenizer` give."""
    import open_clip

    model = build_clip()
    model.load_state_dict(_clip_state())
    model.to(device).eval().requires_grad_(False)
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=model.context_length)
    return model, clip_preprocess(), tokenizer


# --- the generator: an SD-shaped pipeline --------------------------------------------------------


def text_encoder_config(config: dict | None = None) -> dict:
    """The CLIPTextModel config matching the judge's text tower."""
    text = (config or clip_config())["text_cfg"]
    width = text["width"]
    return {
        "vocab_size": text["vocab_size"],
        "hidden_size": width,
        "intermediate_size": int(width * text.get("mlp_ratio", 4.0)),
        "num_attention_heads": text["heads"],
        "num_hidden_layers": text["layers"],
        "max_position_embeddings": text["context_length"],
        "hidden_act": "gelu",  # open_clip's default (exact GELU; quick_gelu is off)
        "layer_norm_eps": 1e-5,
        "projection_dim": (config or clip_config())["embed_dim"],
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 49407,
    }


def text_encoder_state(clip_state: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """open_clip text-tower keys -> transformers CLIPTextModel keys (in_proj split into q, k, v)."""
    out = {
        "embeddings.token_embedding.weight": clip_state["token_embedding.weight"],
        "embeddings.position_embedding.weight": clip_state["positional_embedding"],
        "final_layer_norm.weight": clip_state["ln_final.weight"],
        "final_layer_norm.bias": clip_state["ln_final.bias"],
    }
    for i in range(layers):
        src, dst = f"transformer.resblocks.{i}.", f"encoder.layers.{i}."
        q, k, v = clip_state[src + "attn.in_proj_weight"].chunk(3)
        qb, kb, vb = clip_state[src + "attn.in_proj_bias"].chunk(3)
        pairs = {
            "self_attn.q_proj.weight": q, "self_attn.k_proj.weight": k, "self_attn.v_proj.weight": v,
            "self_attn.q_proj.bias": qb, "self_attn.k_proj.bias": kb, "self_attn.v_proj.bias": vb,
            "self_attn.out_proj.weight": clip_state[src + "attn.out_proj.weight"],
            "self_attn.out_proj.bias": clip_state[src + "attn.out_proj.bias"],
            "layer_norm1.weight": clip_state[src + "ln_1.weight"],
            "layer_norm1.bias": clip_state[src + "ln_1.bias"],
            "layer_norm2.weight": clip_state[src + "ln_2.weight"],
            "layer_norm2.bias": clip_state[src + "ln_2.bias"],
            "mlp.fc1.weight": clip_state[src + "mlp.c_fc.weight"],
            "mlp.fc1.bias": clip_state[src + "mlp.c_fc.bias"],
            "mlp.fc2.weight": clip_state[src + "mlp.c_proj.weight"],
            "mlp.fc2.bias": clip_state[src + "mlp.c_proj.bias"],
        }
        out.update({dst + name: t.clone() for name, t in pairs.items()})
    return {k: v.clone() for k, v in out.items()}


def build_text_encoder(clip_state: dict[str, torch.Tensor] | None = None, config: dict | None = None):
    """A transformers CLIPTextModel holding the judge's text tower."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = config or clip_config()
    te_cfg = text_encoder_config(config)
    with _quiet_transformers():
        model = CLIPTextModel(CLIPTextConfig(**te_cfg))
    state = text_encoder_state(clip_state if clip_state is not None else _clip_state(), te_cfg["num_hidden_layers"])
    model.load_state_dict(state)
    return model.eval()


class _quiet_transformers:
    def __enter__(self):
        from transformers.utils import logging

        self._level = logging.get_verbosity()
        logging.set_verbosity_error()

    def __exit__(self, *exc):
        from transformers.utils import logging

        logging.set_verbosity(self._level)


def build_vae(state: dict[str, torch.Tensor] | None = None):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_config(_read_json(CONFIGS / "vae" / "config.json"))
    if state is not None:
        vae.load_state_dict(state)
    return vae.eval()


def build_unet(state: dict[str, torch.Tensor] | None = None):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_config(_read_json(CONFIGS / "unet" / "config.json"))
    if state is not None:
        unet.load_state_dict(state)
    return unet.eval()


def build_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(_read_json(CONFIGS / "scheduler" / "scheduler_config.json"))


def build_demo_pipeline(unet_weights: str | Path | None = None):
    """The `builtin:demo` StableDiffusionPipeline (fp32, CPU, safety checker off), from the shipped weights.

    unet_weights: another UNet safetensors (a checkpoint while training)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    from engine.sd.tokenizer import load_clip_tokenizer

    _require_weights(CLIP_CONFIG, CLIP_WEIGHTS, VAE_WEIGHTS, Path(unet_weights or UNET_WEIGHTS))
    diffusers_logging.set_verbosity_error()
    pipe = StableDiffusionPipeline(
        vae=build_vae(_load_safetensors(VAE_WEIGHTS)),
        text_encoder=build_text_encoder(),
        tokenizer=load_clip_tokenizer(),
        unet=build_unet(_load_safetensors(Path(unet_weights or UNET_WEIGHTS))),
        scheduler=build_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
