"""The K runs' words inside the frozen text encoders: their slots, prompts and conditioning.

Each run's word is N placeholder slots per text encoder (engine.sd.placeholder), or, for a
per-layer word (P+ / XTI, `--per-layer`), N slots per UNet cross-attention layer: run k's
layer l is the slot word `words[k][l]`.  A training prompt is then tokenized once per layer,
each copy with that layer's slots ([T, L, 77] per encoder, so indexing by template keeps the
layers together), and a batch's L copies go through the text encoder at once, layer-major;
`LayerStates` (engine.sd.per_layer) hands layer l of the UNet its own encoding.  This is
kohya's XTI training (one encoder pass per layer and prompt), batched.  A plain word is the
L = 1 case of the same code.
"""

from __future__ import annotations

import contextlib

import torch

from engine.sd.placeholder import WordLayout, add_slots, installed_in_all, slot_tokens
from engine.sd.tokenizer import clone_tokenizer


class RunWords:
    """Slots, tokenizers, tokenized templates and conditioning of K runs trained together."""

    def __init__(self, model, layout: WordLayout, device, k: int):
        self.model, self.family, self.encoders, self.layout = model, model.family, model.encoders, layout
        self.hook = None
        if layout.layers > 1:
            from engine.sd.per_layer import LayerStates, unet_layers

            self.hook = LayerStates(model.unet, unet_layers(model))
        self.device = device
        self.tokenizers = [clone_tokenizer(tok) for _, tok in self.encoders]
        self.k = k
        self.words = self._add_slots(k)  # [run][layer] -> the slot word

    @property
    def layer_keys(self) -> tuple[str, ...]:
        return tuple(layer.key for layer in self.hook.layers) if self.hook else ()

    def _add_slots(self, k: int) -> list[list[str]]:
        """Slots for k runs: run r's layer l vector j is slot (r*L + l)*N + j, as WordLayout.block orders them."""
        n, layers = self.layout.n, self.layout.layers
        for tok in self.tokenizers:
            add_slots(tok, k * layers * n)
        names = slot_tokens(k * layers * n)
        return [[" ".join(names[(r * layers + layer) * n:(r * layers + layer + 1) * n]) for layer in range(layers)]
                for r in range(k)]

    def tokenize(self, k: int, templates: list[str]) -> list[torch.Tensor]:
        """Run k's prompt templates per encoder: [T, 77] ids, or for a per-layer word [T, L, 77]
        (each layer's copy with that layer's word)."""
        per_layer = [self.family.tokenize(self.tokenizers, [t.format(word) for t in templates])
                     for word in self.words[k]]
        if self.hook is None:
            return [ids.to(self.device) for ids in per_layer[0]]
        return [torch.stack([ids[e] for ids in per_layer], dim=1).to(self.device) for e in range(len(self.encoders))]

    def condition(self, ids: list[torch.Tensor], micro=None) -> dict:
        """UNet keyword arguments for a batch's ids per encoder ([B, 77]; per-layer: [B, L, 77]).
        Per-layer: the L copies go through the encoder as one batch and the hook hands layer l its
        own whenever the UNet is conditioned on what this returns (`LayerStates.keyed`: a
        checkpointed UNet's recomputation in backward reads the same)."""
        if self.hook is None:
            return self.family.condition(self.encoders, ids, micro)
        batch, layers = ids[0].shape[0], ids[0].shape[1]
        flat = [x.transpose(0, 1).reshape(-1, x.shape[-1]) for x in ids]  # layer-major
        hidden = self.family.condition(self.encoders, flat, micro)["encoder_hidden_states"]
        return {"encoder_hidden_states": self.hook.keyed(hidden.view(layers, batch, *hidden.shape[1:]))}

    @contextlib.contextmanager
    def installed(self, vectors: torch.Tensor):
        """The trained matrix's rows in every encoder (and the per-layer hooks), for the run only."""
        blocks = [lambda e=e: self.layout.block(vectors, e) for e in range(len(self.encoders))]
        with installed_in_all(self.encoders, blocks), (self.hook.installed() if self.hook else
                                                       contextlib.nullcontext()):
            yield

    def sample(self, k: int, prompt: str, **kwargs) -> list:
        """`sample_prompt` for run k while its rows are installed (previews): `prompt` holds run k's
        word (`words[k][0]`); a per-layer word's prompt is encoded once per layer, each copy with
        that layer's word."""
        from engine.sd.generation import sample_layer_prompts, sample_prompt

        if self.hook is None:
            return sample_prompt(self.model, prompt, self.tokenizers, **kwargs)
        prompts = [prompt.replace(self.words[k][0], word) for word in self.words[k]]
        return sample_layer_prompts(self.model, prompts, self.tokenizers, self.hook, **kwargs)

    def sample_pairs(self, k: int, pairs: list[tuple[str, int]], steps: int, guidance: float) -> list:
        """`sample_prompts` (one image per (prompt, seed)) for run k's word: probes."""
        from engine.sd.generation import sample_prompts

        if self.hook is None or not any(self.words[k][0] in p for p, _ in pairs):
            return sample_prompts(self.model, pairs, self.tokenizers, steps, guidance)
        return [self.sample(k, p, seeds=[seed], steps=steps, guidance=guidance)[0] for p, seed in pairs]
