"""Starting a run from an existing embedding: `--init-from FILE` or `--init-from NAME@RUN[:STEP]`.

FILE is any layout engine.sd.formats reads (an A1111 .pt, a kohya file, diffusers'
SDXL pair, ...); NAME@RUN:STEP picks a run's embedding from the library, as
`--use` does for generation.  The embedding must fit the model (its family's
widths) and the run's word size (--vectors); anything else is a one-line error
before the run starts.
"""

from __future__ import annotations

from pathlib import Path

from engine.errors import UserError
from engine.sd.formats import Embedding, check_fits, read_embedding


def starting_blocks(spec: str, info, vectors: int, home: Path, layers=()) -> list:
    """The [vectors, width] block per text encoder that the run starts from; for a per-layer run
    (`layers`: its layer keys) [L*vectors, width]: a per-layer word as it is, a plain word in
    every layer."""
    emb = load_init_from(spec, home)
    check_fits(emb, info)
    if emb.num_vectors != vectors:
        raise UserError(
            f"--init-from {spec} holds {emb.num_vectors} vector(s) per encoder but --vectors is {vectors}; "
            f"pass --vectors {emb.num_vectors}"
        )
    if emb.layers and not layers:
        raise UserError(f"--init-from {spec} is a per-layer word ({len(emb.layers)} layers); add --per-layer, "
                        "or start from a plain word")
    if layers and not emb.layers:
        return [b.repeat(len(layers), 1) for b in emb.blocks]
    return list(emb.blocks)


def load_init_from(spec: str, home: Path) -> Embedding:
    if not isinstance(spec, str) or not spec.strip():
        raise UserError("--init-from is empty; give an embedding file or NAME@RUN:STEP")
    path = Path(spec).expanduser()
    if path.exists():
        return read_embedding(path)
    if "@" in spec:
        from engine.sd.generation import load_used, parse_use
        from engine.store.library import Library

        library = Library(home)
        name, run, step = parse_use(spec, library)
        used = load_used(library.get(name), run, step)
        return Embedding(used.vectors, used.token, "diffusers", step=used.step, meta={"path": str(used.path)},
                         vectors_2=used.vectors_2, layers=used.layers)
    raise UserError(f"--init-from {spec}: no such file, and not NAME@RUN:STEP of a library concept; check it")
