"""Merging learned words: a weighted mix, or a concatenation, of embeddings of one family.

    tistudio merge teapot@RUN:1500 toy --weights 0.7,0.3 --name teapot-toy
    tistudio merge teapot toy --concat --name teapot-and-toy      # a word of N_a + N_b vectors

The result is a new concept (a finished run of kind "merge" holding the vectors), so it
is used, exported and evaluated like any other.  A source is NAME[@RUN[:STEP]] of the
library or an embedding file in any readable layout.

Per-layer words (P+ / XTI) merge layer by layer; a plain word among them stands for itself in
every layer, so the result is per-layer.  Words of different layers do not merge.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from engine.errors import UserError
from engine.inversion.importing import Imported, add_embedding_concept
from engine.sd.formats import Embedding, layer_blocks, read_embedding


def load_source(library, source: str) -> tuple[Embedding, str]:
    """An embedding and where it came from (for the record): a library pick, else a file."""
    from engine.sd.generation import load_used, parse_use

    name = source.split("@", 1)[0]
    if library.exists(source) or library.exists(name):
        name, run, step = parse_use(source, library)
        used = load_used(library.get(name), run, step)
        emb = Embedding(used.vectors, used.token, "diffusers", step=used.step, vectors_2=used.vectors_2,
                        layers=used.layers)
        return emb, f"{name}@{used.run}:{used.step if not used.final else 'final'}"
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(f"{source}: neither a concept of the library nor a file; give NAME[@RUN[:STEP]] or a path")
    return read_embedding(path), str(path.resolve())


def shared_layers(embeddings: list[Embedding]) -> tuple[str, ...]:
    """The layers of the per-layer words among `embeddings` (() if none); they must agree."""
    found = {e.layers for e in embeddings if e.layers}
    if len(found) > 1:
        raise UserError("these per-layer words have different layers (" +
                        "; ".join(f"{len(x)} layers" for x in sorted(found, key=len)) + "); merge words of one model")
    return found.pop() if found else ()


def _per_layer(e: Embedding, i: int, layers: tuple[str, ...]) -> torch.Tensor:
    """Block i as [L, n, width]: a per-layer word's own, a plain word's in every layer."""
    block = layer_blocks(e.blocks[i], e.layers)
    return block.expand(max(1, len(layers)), -1, -1)


def mix(embeddings: list[Embedding], weights: list[float]) -> tuple[torch.Tensor, ...]:
    """The weighted sum of equally shaped words, block by block (per-layer words: layer by layer)."""
    shapes = {tuple(b.shape[0] // max(1, len(e.layers)) for b in e.blocks) for e in embeddings}
    if len(shapes) != 1:
        counts = ", ".join(str(e.num_vectors) for e in embeddings)
        raise UserError(f"a weighted mix needs words of one size; these have {counts} vector(s): use --concat")
    layers = shared_layers(embeddings)
    return tuple(sum(w * _per_layer(e, i, layers) for w, e in zip(weights, embeddings)).flatten(0, 1)
                 for i in range(len(embeddings[0].blocks)))


def concat(embeddings: list[Embedding]) -> tuple[torch.Tensor, ...]:
    """One word whose vectors are the sources' vectors in order (per-layer words: in each layer)."""
    layers = shared_layers(embeddings)
    return tuple(torch.cat([_per_layer(e, i, layers) for e in embeddings], dim=1).flatten(0, 1)
                 for i in range(len(embeddings[0].blocks)))


def merge(library, sources: list[str], *, name: str, weights: list[float] | None = None, concatenate: bool = False,
          token: str | None = None, description: str | None = None, property: str = "object") -> Imported:
    if len(sources) < 2:
        raise UserError("give at least two embeddings to merge")
    loaded = [load_source(library, s) for s in sources]
    embeddings = [e for e, _ in loaded]
    families = {e.widths for e in embeddings}
    if len(families) != 1:
        listed = "; ".join(f"{s}: {e.family or 'unknown'} {list(e.widths)}" for s, e in zip(sources, embeddings))
        raise UserError(f"only embeddings of one model family merge ({listed})")
    if concatenate:
        if weights:
            raise UserError("--weights mixes words; --concat joins them; give one or the other")
        blocks, how = concat(embeddings), {"mode": "concat"}
    else:
        weights = weights or [1.0 / len(sources)] * len(sources)
        if len(weights) != len(sources) or not all(math.isfinite(w) for w in weights):
            raise UserError(f"--weights needs {len(sources)} numbers, one per embedding, e.g. "
                            f"{','.join(['0.5'] * len(sources))}")
        blocks, how = mix(embeddings, weights), {"mode": "mix", "weights": weights}
    merged = Embedding(blocks[0].contiguous(), None, "diffusers",
                       vectors_2=blocks[1].contiguous() if len(blocks) > 1 else None, layers=shared_layers(embeddings))
    params = {"sources": [where for _, where in loaded], **how}
    return add_embedding_concept(library, merged, "merge", params, name=name, token=token,
                                 description=description, property=property)
