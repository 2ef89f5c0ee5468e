"""The Library's word inspector panel: what a learned word looks like beside the words the
model already knows, from an `inspect` job's result (engine.inversion.inspector).

Per text encoder: the vocabulary's norm distribution; per vector: its norm against it (a
word grown far past the vocabulary's is the "too strong" word that ignores the rest of a
prompt), its cosine to the token it started from, the nearest vocabulary tokens; and for a
concept with several runs, the cosines between their words (do seeds find the same word?).
"""

from __future__ import annotations

from tistudio.formatting import escape

NEAREST_SHOWN = 10
LABEL_WIDTH = 26


def _f(value, fmt: str = "{:.2f}") -> str:
    return fmt.format(value) if isinstance(value, (int, float)) else "–"


def inspect_text(result: dict) -> str:
    """The inspector's report as Textual markup, a few lines per vector."""
    from engine.sd.family import FAMILY_LABELS

    which = "final" if result.get("final") else f"step {result.get('step')}"
    vectors = result.get("vectors")
    lines = [f"[b]{escape(result.get('concept', '?'))}@{escape(result.get('run', '?'))}[/b] ({which}) · "
             f"{escape(FAMILY_LABELS.get(result.get('family'), result.get('family') or '?'))} · "
             f"{vectors} vector{'s' if vectors != 1 else ''} · token {escape(result.get('token', '?'))}"]
    for encoder in result.get("encoders") or []:
        vocab = encoder.get("vocab") or {}
        lines.append(f"[b]{escape(encoder.get('name', 'text encoder'))}[/b] ({encoder.get('width', '?')} wide): "
                     f"vocabulary norm median {_f(vocab.get('median'))}, 5–95% {_f(vocab.get('p05'))}–"
                     f"{_f(vocab.get('p95'))}, max {_f(vocab.get('max'))}")
        for vector in encoder.get("vectors") or []:
            lines += _vector_lines(vector)
    lines += _runs_lines(result.get("runs") or {})
    return "\n".join(lines)


def _vector_lines(vector: dict) -> list[str]:
    ratio = vector.get("norm_vs_median")
    strong = isinstance(ratio, (int, float)) and ratio > 2
    norm = (f"norm {_f(vector.get('norm'))} = {_f(ratio, '{:.1f}')}× median "
            f"({_f(vector.get('norm_percentile'), '{:.1f}')}th percentile)")
    layer = f" {escape(vector['layer'])}" if vector.get("layer") else ""  # a per-layer word's UNet layer
    line = f" #{vector.get('index', 0)}{layer} " + (f"[$warning]{norm}[/]" if strong else norm)
    if vector.get("init_token") is not None:
        line += f" · cos to {escape(repr(vector['init_token']))} {_f(vector.get('cos_init'))}"
    nearest = " · ".join(f"{escape(n.get('token', '?'))} {_f(n.get('cos'))}"
                         for n in (vector.get("nearest") or [])[:NEAREST_SHOWN])
    return [line, f"    [dim]nearest:[/dim] {nearest or '–'}"]


def _runs_lines(runs: dict) -> list[str]:
    """The cosine matrix between the concept's runs' words (two or more runs)."""
    ids, cosine = runs.get("ids") or [], runs.get("cosine") or []
    if len(ids) < 2 or len(cosine) != len(ids):
        return []
    labels = runs.get("labels") or ids
    names = [_short(str(label or run)) for label, run in zip(labels, ids)]
    lines = ["[b]Runs[/b]: cosine between their words (do seeds find the same word?)",
             " " * (LABEL_WIDTH + 1) + " ".join(f"{i + 1:>5}" for i in range(len(ids)))]
    for i, (name, row) in enumerate(zip(names, cosine)):
        cells = " ".join(f"{_f(c):>5}" for c in row)
        lines.append(f"{i + 1:>2} {escape(name):<{LABEL_WIDTH - 2}} {cells}")
    return lines


def _short(text: str) -> str:
    return text if len(text) <= LABEL_WIDTH - 2 else text[: LABEL_WIDTH - 3] + "…"
