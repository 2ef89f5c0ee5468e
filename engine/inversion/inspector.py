"""See the vector: what a learned word looks like beside the words the model already knows.

Per text encoder and per vector: its norm against the vocabulary's norm distribution (a word
grown far past it is the "too strong" word users complain of), its cosine to the
initializer it started from, and the nearest vocabulary tokens.  For a concept with several
runs, the cosines between their words: do different seeds find the same word?  A per-layer
word (P+ / XTI) is shown layer by layer: each vector says which UNet layer it conditions.
"""

from __future__ import annotations

import torch

from engine.errors import UserError
from engine.store.words import FINAL_NAME, done_runs, read_record, run_vectors

TOP = 10


def inspect_word(model, library, name: str, run: str | None = None, step: int | None = None,
                 top: int = TOP) -> dict:
    """The inspector's report for NAME@RUN:STEP (default: the latest finished run's final word)."""
    from engine.sd.generation import load_used

    if not 1 <= top <= 100:
        raise UserError("--top must be between 1 and 100")
    concept = library.get(name)
    used = load_used(concept, run, step)
    blocks = used.blocks
    if tuple(b.shape[1] for b in blocks) != tuple(model.info.text_widths):
        raise UserError(f"{concept.name}@{used.run} was made for widths {[b.shape[1] for b in blocks]}, "
                        f"but the model has {list(model.info.text_widths)}; inspect it with the model it fits")
    record = read_record(concept.runs_dir / used.run) or {}
    n = int(blocks[0].shape[0]) // max(1, len(used.layers))
    init_words = _init_tokens(model, concept, record, n)
    encoders = []
    for e, ((encoder, tokenizer), block) in enumerate(zip(model.encoders, blocks)):
        table = encoder.get_input_embeddings().weight.detach().float().cpu()
        encoders.append(_encoder_report(e, table, tokenizer, block.float().cpu(), init_words[e], top, used.layers))
    return {
        "concept": concept.name, "token": concept.token, "run": used.run, "step": used.step, "final": used.final,
        "family": model.info.family, "vectors": n, "layers": list(used.layers), "encoders": encoders,
        "runs": compare_runs(concept),
    }


def _encoder_report(e: int, table: torch.Tensor, tokenizer, block: torch.Tensor, init_ids: list[int] | None,
                    top: int, layers=()) -> dict:
    """Each vector of the block ([n, width]; a per-layer word's [L*n, width], layer-major)."""
    norms = table.norm(dim=-1)
    unit_table = table / norms.clamp(min=1e-12).unsqueeze(1)
    median = float(norms.median())
    vectors, n = [], block.shape[0] // max(1, len(layers))
    for i, v in enumerate(block):
        j = i % n
        norm = float(v.norm())
        cos = unit_table @ (v / v.norm().clamp(min=1e-12))
        best = torch.topk(cos, top)
        item = {
            "index": j, "norm": norm, "norm_percentile": float((norms < norm).float().mean() * 100),
            "norm_vs_median": norm / median if median else None,
            "nearest": [{"token": _token_text(tokenizer, int(i)), "cos": float(c)}
                        for c, i in zip(best.values, best.indices)],
            "init_token": None, "cos_init": None,
        }
        if layers:
            item["layer"] = layers[i // n]
        if init_ids is not None:
            item["init_token"] = _token_text(tokenizer, init_ids[j])
            item["cos_init"] = float(cos[init_ids[j]])
        vectors.append(item)
    q = torch.quantile(norms, torch.tensor([0.05, 0.95]))
    return {"name": "text_encoder" if e == 0 else f"text_encoder_{e + 1}", "width": int(table.shape[1]),
            "vocab": {"median": median, "p05": float(q[0]), "p95": float(q[1]), "max": float(norms.max())},
            "vectors": vectors}


def _init_tokens(model, concept, record: dict, n: int) -> list[list[int] | None]:
    """Per encoder, the token id each vector started from; None where the run started from a file."""
    from engine.store.library import initializer_ids

    params = {**(record.get("params") or {}), **(record.get("config") or {})}
    if params.get("init_from") or concept.init == "*" or record.get("kind") in ("import", "merge"):
        return [None] * len(model.encoders)
    init = params.get("init") or concept.init
    try:
        return [initializer_ids(tokenizer, init, n) for _, tokenizer in model.encoders]
    except UserError:
        return [None] * len(model.encoders)


def _token_text(tokenizer, token_id: int) -> str:
    text = tokenizer.convert_ids_to_tokens(int(token_id))
    return text[:-4] if text.endswith("</w>") else text


def compare_runs(concept) -> dict:
    """Mean cosine, vector by vector and encoder by encoder, between the final words of the concept's
    finished runs of one shape: 1.0 means the runs found the same word."""
    from engine.sd.formats import read_embedding

    words, ids, labels = [], [], []
    for run in done_runs(concept):
        emb = read_embedding(run.dir / FINAL_NAME)
        words.append([b.float() for b in emb.blocks])
        ids.append(run.id)
        params = run.params
        labels.append(run.get("label") or f"seed {params.get('seed', '?')}, init {params.get('init', '?')}"
                      f", {run_vectors(run.record)} vector(s)")
    cosine = [[_word_cosine(a, b) for b in words] for a in words]
    return {"ids": ids, "labels": labels, "cosine": cosine}


def _word_cosine(a: list[torch.Tensor], b: list[torch.Tensor]) -> float | None:
    if [t.shape for t in a] != [t.shape for t in b]:
        return None  # words of different sizes or families have no vector-by-vector cosine
    sims = [torch.nn.functional.cosine_similarity(x, y, dim=-1).mean() for x, y in zip(a, b)]
    return float(torch.stack(sims).mean())
