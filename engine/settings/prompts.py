"""Prompt sets for measuring and showing a concept: templates with `{}` where the token goes.

* neutral   the one prompt used for reconstruction (the concept, nothing else asked of it)
* edit      three prompts that ask for a change (the paper's editability uses three)
* synthesis the paper's section 5 batches: text-guided synthesis (objects), style transfer (styles)

Edit and synthesis prompts follow the model: SD knows beaches and Van Gogh, but
builtin:demo knows only its world's words (shapes, colours, sizes, positions,
backgrounds; demo/world.py), so on it they are asked in those words.

Templates are filled with `fill`, never `str.format`, so a prompt may hold other
braces.  A user's own set comes from a text file, one template per line.
"""

from __future__ import annotations

import os
from pathlib import Path

from engine.errors import UserError

NEUTRAL = {
    "object": "a photo of {}",
    "style": "a painting in the style of {}",
}

EDIT = {
    "object": (
        "a {} on the beach",
        "a {} in the jungle",
        "a painting of a {} in the style of Van Gogh",
    ),
    "style": (
        "a painting of a dog in the style of {}",
        "a painting of a city street at night in the style of {}",
        "a painting of a mountain lake in the style of {}",
    ),
}

# Section 5.1 places a learned object in new scenes and schools of art;
# section 5.2 paints unrelated subjects in a learned style.
SYNTHESIS = {
    "object": (
        "a photo of a {} in the snow",
        "a photo of a {} on the moon",
        "a {} in a futuristic city at night",
        "a watercolor painting of a {}",
        "a {} made of lego",
        "an oil painting of a {} in the style of Rembrandt",
        "a pencil sketch of a {}",
        "a {} as a cartoon character",
    ),
    "style": (
        "a cat in the style of {}",
        "the Eiffel Tower in the style of {}",
        "a portrait of an old man in the style of {}",
        "a bowl of fruit in the style of {}",
        "a sailing ship in a storm in the style of {}",
        "a forest in autumn in the style of {}",
        "a robot reading a book in the style of {}",
        "a castle on a hill in the style of {}",
    ),
}


# builtin:demo's world: what its generator and its judge have words for.
DEMO_SPEC = "builtin:demo"
DEMO_EDIT = {
    "object": (
        "a photo of a {} on a blue background",
        "a photo of a small {} on the left",
        "a photo of a big {} at the top on a night background",
    ),
    "style": (
        "a painting of a red circle in the style of {}",
        "a painting of a big blue star on the left in the style of {}",
        "a painting of a small yellow heart on a night background in the style of {}",
    ),
}
DEMO_SYNTHESIS = {
    "object": DEMO_EDIT["object"] + (
        "a photo of a {} on a grass background",
        "a photo of a small {} at the bottom on a red background",
        "a photo of a big {} on the right on a white background",
    ),
    "style": DEMO_EDIT["style"] + (
        "a painting of a green square in the style of {}",
        "a painting of a small purple triangle at the top in the style of {}",
        "a painting of a big orange cross on a gray background in the style of {}",
    ),
}


def fill(template: str, text: str) -> str:
    """Put `text` where `{}` stands (every occurrence)."""
    return template.replace("{}", text)


def without_placeholder(template: str) -> str:
    """The prompt with the concept removed, as the original TI code embeds edit prompts for CLIP."""
    return " ".join(fill(template, "").split())


def neutral_prompt(prop: str) -> str:
    return NEUTRAL.get(prop, NEUTRAL["object"])


def edit_prompts(prop: str, model_spec: str | None = None) -> list[str]:
    sets = DEMO_EDIT if model_spec == DEMO_SPEC else EDIT
    return list(sets.get(prop, sets["object"]))


def synthesis_prompts(prop: str, model_spec: str | None = None) -> list[str]:
    sets = DEMO_SYNTHESIS if model_spec == DEMO_SPEC else SYNTHESIS
    return list(sets.get(prop, sets["object"]))


def load_prompts(path: os.PathLike | str) -> list[str]:
    """One template per line, each with `{}` where the token goes; blank lines and # comments skipped."""
    return _checked(Path(path), _lines(Path(path)))


def load_templates(path: os.PathLike | str) -> list[str]:
    """Training templates, one per line: ours (`{}` for the word, `{caption}` for the image's
    caption) or A1111's (`[name]` for the word, `[filewords]` for the caption, as in its
    textual_inversion_templates), read as ours."""
    path = Path(path)
    lines = [line.replace(A1111_NAME, "{}").replace(A1111_FILEWORDS, "{caption}") for line in _lines(path)]
    return _checked(path, lines, mark="{} (or A1111's [name])")


A1111_NAME, A1111_FILEWORDS = "[name]", "[filewords]"


def _lines(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(f"prompts file {path} not found; check the path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read prompts file {path} ({type(exc).__name__}); give a UTF-8 text file") from None
    return lines


def _checked(path: Path, lines: list[str], mark: str = "{}") -> list[str]:
    prompts = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not prompts:
        raise UserError(f"prompts file {path} holds no prompts; write one prompt per line, each with {{}}")
    for number, prompt in enumerate(prompts, 1):
        if "{}" not in prompt:
            raise UserError(
                f"prompts file {path}: prompt {number} ({prompt[:40]!r}) has no {mark}; mark where the token goes"
            )
    return prompts
