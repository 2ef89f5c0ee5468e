"""How a run reads its images: captions in the prompts, masked loss, aspect-ratio buckets, and
the moving average of the word it saves; the checks of those settings.  Torch-free, like every
settings module: the CLI and the studio refuse a bad `--ema` with the engine's own words.

* `{caption}` in a template is the image's caption (engine.store.annotations), as A1111's
  `[filewords]`; a templates file in A1111's words (`[name]`, `[filewords]`) is read by
  engine.settings.prompts.load_templates.  With no templates of its own and captioned images,
  a run trains on the study's templates followed by the caption: A1111's default
  (`subject_filewords.txt`: "a photo of a [name], [filewords]").
* `--masked-loss`: the mask weights the loss per latent pixel (kohya's `masked_loss` option).
* `--buckets`: each image at the size nearest its aspect ratio (engine.inversion.buckets).
* `--ema DECAY`: OneTrainer's moving average of the trained vectors (engine.inversion.ema).
"""

from __future__ import annotations

import math

CAPTION = "{caption}"  # where a template puts the image's caption
EMA_EXAMPLE = 0.99


def checks(config):
    """(ok, message) pairs for TrainConfig._checks: each message names the CLI option."""
    yield isinstance(config.masked_loss, bool), "--masked-loss is on or off: give the flag, or true/false"
    yield isinstance(config.buckets, bool), "--buckets is on or off: give the flag, or true/false"
    yield (not (config.buckets and config.center_crop),
           "--buckets keeps each image's aspect ratio and --center-crop crops it square: drop one")
    yield (not (config.buckets and config.compile != "off"),
           "--buckets trains at several image sizes, which a compiled UNet would compile again for each; "
           "drop --compile")
    yield (config.ema is None or (_number(config.ema) and 0 < config.ema < 1),
           f"--ema must be a decay between 0 and 1 (not either), e.g. {EMA_EXAMPLE}")


def caption_templates(templates) -> list[str]:
    """The study's templates with the caption after them (A1111's "a photo of a [name], [filewords]")."""
    return [f"{t}, {CAPTION}" for t in templates]


def with_caption(template: str, caption: str | None) -> str:
    """`template` with `{caption}` replaced by the caption; without one, the caption's place
    and the comma or spaces around it go, so "a photo of a {}, {caption}" reads "a photo of a {}"."""
    if CAPTION not in template:
        return template
    text = template.replace(CAPTION, caption or "")
    if caption:
        return text
    return " ".join(text.replace(" ,", ",").split()).strip(" ,").replace(",,", ",")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
