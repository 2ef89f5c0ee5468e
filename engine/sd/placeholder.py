"""New words in a frozen text encoder, without touching its token table.

`PlaceholderEmbedding` wraps the encoder's input embedding: ids below the
table size look up the frozen table as before; ids at or above it pick rows
of a small `vectors` tensor (one per placeholder).  Only `vectors` is ever
trained, so the 49k-row table stays bit-for-bit frozen and the optimizer
touches K vectors, not the whole table.  With K rows, K independent runs
(seeds, initializer words, concepts) share one text-encoder and UNet call.

A word of N vectors is N consecutive placeholder ids, in every text encoder
of the model (SDXL has two).  Training keeps run k's whole word as one row of
a [K, P] matrix (`WordLayout`): its N vectors for encoder 1, then its N
vectors for encoder 2.  The optimizer treats a row as one run (one step count,
one overflow skip), and each encoder reads its [K*N, width] block of that
matrix at every forward.

A per-layer word (P+ / XTI, `layers` > 1) holds N vectors per UNet cross-attention layer:
within an encoder's span, layer l's N vectors follow layer l-1's, so encoder e's block is
[K*L*N, width] with run k's layer l vector j at row (k*L + l)*N + j, and one run's split
block is [L*N, width] layer-major, the order kohya's XTI files concatenate.  A plain word is
the L = 1 case: the layout (and every checkpoint written before layers existed) is unchanged.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

Rows = "torch.Tensor | Callable[[], torch.Tensor]"


class PlaceholderEmbedding(nn.Module):
    def __init__(self, base: nn.Embedding, vectors: Rows):
        super().__init__()
        self.base = base
        self.base_size = base.num_embeddings
        # [S, dim] fp32 (usually a leaf with requires_grad), or a function returning it,
        # called at every forward so that it reads the trained matrix as it is now.
        self.vectors = vectors

    def rows(self) -> torch.Tensor:
        return self.vectors() if callable(self.vectors) else self.vectors

    @property
    def weight(self) -> torch.Tensor:  # some callers read .weight.dtype / .device
        return self.base.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        is_new = input_ids >= self.base_size
        frozen = self.base(input_ids.masked_fill(is_new, 0))
        rows = self.rows()
        slot = (input_ids - self.base_size).clamp(min=0, max=rows.shape[0] - 1)
        new = rows.to(frozen.dtype)[slot]
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
def placeholders_installed(text_encoder, vectors: Rows):
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


@contextlib.contextmanager
def installed_in_all(encoders, rows: list[Rows]):
    """`placeholders_installed` on each text encoder of a model (SDXL: both), with its rows."""
    with contextlib.ExitStack() as stack:
        for (text_encoder, _), block in zip(encoders, rows, strict=True):
            stack.enter_context(placeholders_installed(text_encoder, block))
        yield


@dataclass(frozen=True)
class WordLayout:
    """Where a word of `n` vectors per encoder sits in one flat row of P floats."""

    widths: tuple[int, ...]  # one per text encoder
    n: int  # vectors per encoder (per layer, for a per-layer word)
    layers: int = 1  # UNet cross-attention layers with a vector set of their own (1: a plain word)

    @property
    def rows(self) -> int:
        """Vectors per encoder in one run's block: layers x n."""
        return self.layers * self.n

    @property
    def size(self) -> int:
        return self.rows * sum(self.widths)

    def _span(self, e: int) -> tuple[int, int]:
        start = self.rows * sum(self.widths[:e])
        return start, start + self.rows * self.widths[e]

    def block(self, rows: torch.Tensor, e: int) -> torch.Tensor:
        """[K, P] -> encoder e's [K*L*n, width]: run k's layer l vector j is row (k*L + l)*n + j
        (differentiable)."""
        start, end = self._span(e)
        return rows[:, start:end].reshape(-1, self.widths[e])

    def split(self, row: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One run's row [P] -> its [L*n, width] block per encoder (layer-major)."""
        return tuple(row[slice(*self._span(e))].reshape(self.rows, w) for e, w in enumerate(self.widths))

    def join(self, blocks) -> torch.Tensor:
        """[L*n, width] per encoder -> one row [P]."""
        blocks = list(blocks)
        shapes = [tuple(b.shape) for b in blocks]
        if shapes != [(self.rows, w) for w in self.widths]:
            per_layer = f" in each of {self.layers} layers" if self.layers > 1 else ""
            raise ValueError(f"blocks {shapes} do not fit a word of {self.n} vectors{per_layer} of widths "
                             f"{self.widths}")
        return torch.cat([b.reshape(-1) for b in blocks])
