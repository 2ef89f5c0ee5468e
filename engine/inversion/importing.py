"""Importing an embedding file as a concept without images, ready for generation.

The imported vectors become a finished run of kind "import", so everything that
looks for "the concept's latest finished run" (generate, export, eval) finds it.
The file must fit the active model's family (its widths: 768 SD 1.x, 1024 SD 2.x,
768 + 1280 SDXL), and a per-layer word (kohya XTI) the model's UNet cross-attention layers;
one that does not is refused before anything is written.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from engine.errors import UserError
from engine.sd.formats import check_fits, read_embedding, run_format, write_embedding
from engine.sd.models import load_tokenizer, model_info
from engine.store.library import default_token, validate_name
from engine.store.runs import create_run, set_status
from engine.store.words import FINAL_NAME

IMPORT_INIT = "*"  # an imported vector has no initializer word


@dataclass
class Imported:
    concept: object  # engine.store.library.Concept
    run: str
    vectors: int  # vectors per encoder
    family: str  # the model family the embedding was checked against
    notes: list[str] = field(default_factory=list)  # e.g. what in the file was ignored


def import_embedding_file(library, path: Path, *, name: str | None = None, token: str | None = None,
                          description: str | None = None, property: str = "object"):
    """Import `path` as a concept; returns (concept, run id).  `import_embedding` says more."""
    result = import_embedding(library, path, name=name, token=token, description=description, property=property)
    return result.concept, result.run


def import_embedding(library, path: Path, *, name: str | None = None, token: str | None = None,
                     description: str | None = None, property: str = "object") -> Imported:
    emb = read_embedding(path)
    params = {"source": str(Path(path).resolve()), "format": emb.format, "ignored": emb.meta.get("ignored", [])}
    result = add_embedding_concept(library, emb, "import", params, name=name or _name_from(emb.token, path),
                                   token=token, description=description, property=property)
    result.notes = [f"ignored {key} (output-side vectors this model has no place for)"
                    for key in emb.meta.get("ignored", [])]
    return result


def add_embedding_concept(library, emb, kind: str, params: dict, *, name: str, token: str | None = None,
                          description: str | None = None, property: str = "object") -> Imported:
    """A new concept whose word is `emb`: one finished run of `kind` ("import", "merge") holding it.

    The embedding must fit the active model's family; all or nothing: no concept without its embedding."""
    info = model_info()
    check_fits(emb, info)
    name = validate_name(name)
    token = token or (emb.token if _usable_token(emb.token) else default_token(name))
    concept = library.add(name, None, IMPORT_INIT, token=token, property=property,
                          description=description or name, tokenizer=load_tokenizer())
    try:
        per_layer = {"per_layer": True, "layers": list(emb.layers)} if emb.layers else {}
        run_dir = create_run(library.home, {"kind": kind, "concept": concept.name, "params": {
            **params, "vectors": emb.num_vectors, "family": info.family, **per_layer}})
        final = write_embedding(run_dir / FINAL_NAME, emb.blocks, concept.token, run_format(emb.blocks, emb.layers),
                                step=emb.step, layers=emb.layers)
        set_status(run_dir, "done", embedding=str(final), step=emb.step or 0, steps=emb.step or 0)
    except BaseException:
        library.delete(concept.name)
        raise
    return Imported(concept, run_dir.name, emb.num_vectors, info.family)


def _name_from(token: str | None, path: Path) -> str:
    raw = token if token and token != "*" else Path(path).stem
    cleaned = re.sub(r"[^\w\-. ]+", "", raw.strip("<>")).strip(" .")
    if not cleaned:
        raise UserError(f"cannot make a concept name from {Path(path).name}; pass --name NAME")
    return cleaned[:64]


def _usable_token(token: str | None) -> bool:
    return bool(token) and token != "*" and len(token.split()) == 1 and len(token) <= 64
