"""New words in a frozen text encoder, without touching its token table.

`PlaceholderEmbedding` wraps the encoder's input embedding: ids below the
table size look up the frozen table as before; ids at or above it pick rows
of a small `vectors` tensor (one per placeholder).  Only `vectors` is ever
trained, so the 49k-row table stays bit-for-bit frozen and the optimizer
touches K vectors, not the whole table.  With K rows, K independent runs
(seeds, initializer words, concepts) share one text-encoder and UNet call.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


class PlaceholderEmbedding(nn.Module):
    def __init__(self, base: nn.Embedding, vectors: torch.Tensor):
        super().__init__()
        self.base = base
        self.base_size = base.num_embeddings
        self.vectors = vectors  # [K, dim] fp32, usually a leaf with requires_grad

    @property
    def weight(self) -> torch.Tensor:  # some callers read .weight.dtype / .device
        return self.base.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        is_new = input_ids >= self.base_size
        frozen = self.base(input_ids.masked_fill(is_new, 0))
        slot = (input_ids - self.base_size).clamp(min=0, max=self.vectors.shape[0] - 1)
        new = self.vectors.to(frozen.dtype)[slot]
        return torch.where(is_new.unsqueeze(-1), new, frozen)


def slot_tokens(count: int) -> list[str]:
    """Internal placeholder strings; the user's token only matters in saved files."""
    return [f"<tistudio-slot-{k}>" for k in range(count)]


def add_slots(tokenizer, count: int) -> list[int]:
    """Add `count` placeholder tokens after the tokenizer's vocabulary; return their ids."""
    names = slot_tokens(count)
    tokenizer.add_tokens(names)
    ids = tokenizer.convert_tokens_to_ids(names)
    base = len(tokenizer) - count
    assert ids == list(range(base, base + count)), "placeholder ids must follow the vocabulary"
    return ids


@contextlib.contextmanager
def placeholders_installed(text_encoder, vectors: torch.Tensor):
    """Temporarily route new ids to `vectors`; the shared model is restored afterwards."""
    original = text_encoder.get_input_embeddings()
    text_encoder.set_input_embeddings(PlaceholderEmbedding(original, vectors))
    try:
        yield
    finally:
        text_encoder.set_input_embeddings(original)


def initial_vectors(text_encoder, token_ids: list[int]) -> torch.Tensor:
    """fp32 copies of the initializer words' rows: the starting point of each run."""
    table = text_encoder.get_input_embeddings().weight
    return table[torch.tensor(token_ids, device=table.device)].detach().float().clone()
