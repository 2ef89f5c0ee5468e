"""Families behind one seam: how SD 1.x, SD 2.x and SDXL turn a prompt into UNet conditioning.

The families differ in a few places, and only here:

* the text encoders that take placeholder rows (SD 1.x/2.x: one; SDXL: CLIP
  ViT-L `clip_l` and OpenCLIP bigG `clip_g`), with their tokenizers;
* how token ids become conditioning: SD 1.x/2.x give the UNet the encoder's
  last hidden state (after the final layer norm, as diffusers does with no
  clip skip); SDXL gives it the penultimate hidden states of both encoders,
  concatenated, plus `added_cond_kwargs`: encoder 2's pooled projection and
  `add_time_ids` (original size, crop offsets, target size of each image);
* how the tokenizers pad (SD 1.x with <|endoftext|>; SD 2.x and SDXL's
  second tokenizer with "!", id 0);
* which diffusers pipeline generates images, and which widths and keys the
  embedding files of that family carry.

Training (engine.inversion.train), generation (engine.sd.generation), metrics and formats
ask `model.family` instead of testing the family themselves.

This module imports torch only inside functions: the CLI reads labels and
widths from here without paying for torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.sd.tokenizer import EOS, PAD_BANG

FAMILY_LABELS = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}
# The widths of the released models' text encoders: what a file's widths say about its family.
STANDARD_WIDTHS = {(768,): "sd1", (1024,): "sd2", (768, 1280): "sdxl"}


def family_of_widths(widths) -> str | None:
    """sd1 / sd2 / sdxl for the standard widths (768, 1024, 768 + 1280); None for any other."""
    return STANDARD_WIDTHS.get(tuple(int(w) for w in widths))


def describe_widths(widths) -> str:
    """'SDXL (widths 768 + 1280)', 'SD 1.x (width 768)', or 'width 32' when no released family has them."""
    widths = tuple(int(w) for w in widths)
    text = f"width{'s' if len(widths) > 1 else ''} " + " + ".join(str(w) for w in widths)
    name = family_of_widths(widths)
    return f"{FAMILY_LABELS[name]} ({text})" if name else text


def pool_at_eos(text_encoder, tokenizer) -> None:
    """Make the encoder pool at the real end-of-text token, not at the largest id.

    SD-era configs carry the legacy `eos_token_id: 2`, with which transformers pools
    at `input_ids.argmax()`.  Every added placeholder has a larger id than EOS, so the
    pooled output would silently come from the placeholder's position.  SD 1.x/2.x
    UNets never read it, but SDXL's reads encoder 2's pooled projection.  With the
    real EOS id, transformers pools at the first EOS, which is the same position
    for any prompt without added tokens (padding is EOS or "!", id 0).
    """
    eos = tokenizer.eos_token_id
    text_encoder.config.eos_token_id = eos
    for module in text_encoder.modules():
        if "eos_token_id" in vars(module):
            module.eos_token_id = eos


@dataclass(frozen=True)
class Family:
    """SD 1.x: one CLIP ViT-L encoder, its last hidden state."""

    name: str = "sd1"
    block_names: tuple[str, ...] = ("clip_l",)  # one [n, width] block per encoder, in pipeline order
    tokenizer_pads: tuple[str, ...] = (EOS,)

    @property
    def label(self) -> str:
        return FAMILY_LABELS[self.name]

    @property
    def standard_widths(self) -> tuple[int, ...]:
        return next(w for w, name in STANDARD_WIDTHS.items() if name == self.name)

    # --- encoders and tokenizers

    def encoders(self, pipe) -> list[tuple]:
        """(text_encoder, tokenizer) pairs that take placeholder rows, in pipeline order."""
        return [(pipe.text_encoder, pipe.tokenizer)]

    def derived_tokenizers(self) -> list:
        """The tokenizers built offline from open_clip's vocabulary (built-ins, single files)."""
        from engine.sd.tokenizer import load_clip_tokenizer

        return [load_clip_tokenizer(pad) for pad in self.tokenizer_pads]

    @staticmethod
    def tokenize(tokenizers, prompts: list[str]) -> list:
        """Padded ids, [len(prompts), 77], once per tokenizer (each pads its own way)."""
        return [
            tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                return_tensors="pt").input_ids
            for tok in tokenizers
        ]

    # --- conditioning

    def condition(self, encoders, ids: list, micro=None) -> dict:
        """UNet keyword arguments for token ids (one tensor per encoder).

        micro: [B, 6] add_time_ids (SDXL's size conditioning), ignored by SD 1.x/2.x."""
        (text_encoder, _), = encoders
        return {"encoder_hidden_states": text_encoder(ids[0])[0]}

    def token_states(self, encoders, ids: list) -> list:
        """Per encoder, [B, 77, width]: each token's state as the UNet reads it (SD 1.x/2.x: the
        last hidden state, after the final layer norm).  Cross-initialisation starts a word here."""
        (text_encoder, _), = encoders
        return [text_encoder(ids[0])[0]]

    # --- generation

    def pipeline(self, model, scheduler, tokenizers):
        """A pipeline over the model's shared components, with its own scheduler and tokenizers."""
        components = dict(model.pipe.components)
        components["scheduler"] = scheduler
        for name, tokenizer in zip(("tokenizer", "tokenizer_2"), tokenizers):
            components[name] = tokenizer
        pipe = type(model.pipe)(**components, **self._pipeline_options(model.pipe))
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def _pipeline_options(self, pipe) -> dict:
        return {}

    # --- per-layer words (P+ / XTI)

    def cross_layers(self, unet_config) -> tuple:
        """The UNet's cross-attention layers a per-layer word has one vector set for, in the
        order the UNet runs them (engine.sd.layers; SD 1.x/2.x: 16).  UserError if unmappable."""
        from engine.sd.layers import cross_attention_layers

        return cross_attention_layers(unet_config)


@dataclass(frozen=True)
class SD2(Family):
    """SD 2.x: one OpenCLIP ViT-H encoder (diffusers keeps 23 of its 24 layers), its last
    hidden state; the tokenizer pads with "!"."""

    name: str = "sd2"
    block_names: tuple[str, ...] = ("clip_h",)
    tokenizer_pads: tuple[str, ...] = (PAD_BANG,)


@dataclass(frozen=True)
class SDXL(Family):
    """SDXL base: CLIP ViT-L and OpenCLIP bigG, penultimate layers concatenated; bigG's pooled
    projection and the size conditioning go to the UNet's added embedding."""

    name: str = "sdxl"
    block_names: tuple[str, ...] = ("clip_l", "clip_g")
    tokenizer_pads: tuple[str, ...] = (EOS, PAD_BANG)

    def encoders(self, pipe) -> list[tuple]:
        return [(pipe.text_encoder, pipe.tokenizer), (pipe.text_encoder_2, pipe.tokenizer_2)]

    def condition(self, encoders, ids: list, micro=None) -> dict:
        import torch

        if micro is None:
            raise ValueError("SDXL conditioning needs add_time_ids (original size, crop, target size)")
        (encoder_1, _), (encoder_2, _) = encoders
        out_1 = encoder_1(ids[0], output_hidden_states=True)
        out_2 = encoder_2(ids[1], output_hidden_states=True)
        hidden = torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)
        pooled = out_2.text_embeds  # pooled at the EOS position (pool_at_eos), then projected
        return {
            "encoder_hidden_states": hidden,
            "added_cond_kwargs": {"text_embeds": pooled,
                                  "time_ids": micro.to(device=hidden.device, dtype=hidden.dtype)},
        }

    def cross_layers(self, unet_config) -> tuple:
        """Refused: SDXL's 70 cross-attention layers sit 1, 2 or 10 to an attention block, and
        P+ defines one condition per layer of SD 1.x's UNet only (70 words, 11 or one per
        resolution would each be our invention); SDXL also conditions on two encoders."""
        from engine.errors import UserError

        raise UserError("SDXL's 70 cross-attention layers (stacked 2 and 10 deep) have no agreed per-layer "
                        "mapping (P+ and kohya's XTI define SD 1.x's 16)")

    def token_states(self, encoders, ids: list) -> list:
        """Each encoder's penultimate hidden state: what SDXL's UNet reads of it (no final norm)."""
        return [encoder(x, output_hidden_states=True).hidden_states[-2] for (encoder, _), x in zip(encoders, ids)]

    def _pipeline_options(self, pipe) -> dict:
        return {"force_zeros_for_empty_prompt": pipe.config.force_zeros_for_empty_prompt, "add_watermarker": False}


FAMILIES = {f.name: f for f in (Family(), SD2(), SDXL())}


def family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}") from None
