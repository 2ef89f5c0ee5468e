"""Per-layer conditioning (P+ / XTI): each UNet cross-attention layer reads its own prompt encoding.

A per-layer word has one vector set per cross-attention layer (engine.sd.layers).  The
prompt is encoded once per layer, with that layer's vectors in the word's slots, giving
states [L, B, 77, D]; a forward pre-hook on layer l's cross-attention module (its `attn2`)
replaces the encoder hidden states the UNet passes it with states[l].  Self-attention, the
ResNets and everything else are untouched.  Two ways to give the states:

* `given(states)`: every UNet call inside the block (a pipeline's sampling loop);
* `keyed(states)`: the UNet calls whose encoder_hidden_states is states[0] itself (the
  training step: its backward's recomputation under gradient checkpointing reads them again,
  while a preview or probe sampled between steps, with other conditioning, is left alone).

kohya's XTI code does the same by patching the UNet's and the blocks' forward; a hook on
the attention module works with any attention processor and with gradient checkpointing
(the recomputed forward reads the same states), and leaves the shared model as it was.
"""

from __future__ import annotations

import contextlib

import torch

from engine.sd.layers import Layer


class LayerStates:
    """Hands layer l of `layers` its own encoder hidden states while `given` is active."""

    def __init__(self, unet, layers: tuple[Layer, ...] | list[Layer]):
        self.layers = tuple(layers)
        self.modules = [unet.get_submodule(layer.attn2) for layer in self.layers]
        self.states: torch.Tensor | None = None  # [L, B, tokens, D], for every call (`given`)
        self.key: torch.Tensor | None = None  # [L, B, tokens, D], for calls conditioned on key[0] (`keyed`)

    def __len__(self) -> int:
        return len(self.layers)

    @contextlib.contextmanager
    def installed(self):
        """The hooks on the shared UNet, removed afterwards whatever happens."""
        handles = [module.register_forward_pre_hook(self._hook(index), with_kwargs=True)
                   for index, module in enumerate(self.modules)]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
            self.states = self.key = None

    def keyed(self, states: torch.Tensor) -> torch.Tensor:
        """Layer l reads states[l] whenever the UNet is conditioned on the returned states[0]."""
        self._check(states)
        self.key = states
        return states[0]

    @contextlib.contextmanager
    def given(self, states: torch.Tensor):
        """Every UNet call inside reads `states` [L, B, tokens, D], layer by layer."""
        self._check(states)
        self.states = states
        try:
            yield
        finally:
            self.states = None

    def _check(self, states: torch.Tensor) -> None:
        if states.dim() != 4 or states.shape[0] != len(self.layers):
            raise ValueError(f"per-layer states {tuple(states.shape)} do not fit {len(self.layers)} layers")

    def _hook(self, index: int):
        def swap(_module, args, kwargs):
            states, plain = self.states, kwargs.get("encoder_hidden_states")
            if states is None and self.key is not None and plain is not None and _same(plain, self.key[0]):
                states = self.key
            if states is None:
                return None  # a call of its own (not inside `given`, not the keyed conditioning)
            if plain is None or plain.shape[0] != states.shape[1]:
                raise RuntimeError(f"cross-attention layer {self.layers[index].key} got a batch of "
                                   f"{None if plain is None else plain.shape[0]}, its states {states.shape[1]}")
            return args, {**kwargs, "encoder_hidden_states": states[index].to(plain.dtype)}
        return swap


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same tensor (or a detached view of it, as a checkpointed recomputation passes)."""
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape


def unet_layers(model) -> tuple[Layer, ...]:
    """The loaded model's per-layer mapping, from its UNet's own config (UserError: unmappable)."""
    return model.family.cross_layers(dict(model.unet.config))


@torch.no_grad()
def sample_per_layer(pipe, hook: LayerStates, cond: torch.Tensor, uncond: torch.Tensor | None, images: int,
                     **call):
    """Run `pipe` on per-layer prompt embeddings: cond (and, with guidance, uncond) [L, 1, tokens, D],
    each layer's encoding of one prompt.  The pipeline gets layer 0's as its prompt_embeds (for
    shapes; every cross-attention layer reads its own through `hook`) and makes `images` images."""
    cond_rep = cond.repeat_interleave(images, dim=1)
    states = cond_rep if uncond is None else torch.cat([uncond.repeat_interleave(images, dim=1), cond_rep], dim=1)
    with hook.given(states):
        return pipe(prompt_embeds=cond[0], negative_prompt_embeds=None if uncond is None else uncond[0],
                    num_images_per_prompt=images, **call)
