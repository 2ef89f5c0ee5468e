"""One run's training data on the device, and the draws of a micro-batch from it.

`build_run_data` reads the run's images with what they carry (engine.store.annotations) and
makes:

* its latent caches, one per bucket (`--buckets`, engine.inversion.buckets), else one for
  all the images squared as before; with `--masked-loss`, each image's mask on its cache's
  latent grid (ones for an image without a mask: it counts whole);
* its prompts: each template with the word, and where templates place a caption
  (`{caption}`), one prompt per image and template, image-major (row = image·T + template).

`RunData.draw` makes a micro-batch's draws on the host from the run's own generator, in the
order they always were (image, flip, template, timestep, posterior noise, noise), so a run
without buckets draws exactly what it drew before.  With buckets it first draws one image
over all of them (each image as likely as before), takes that image's bucket, and draws the
rest of the batch within it: a batch never mixes sizes.  The bucket is a host number (it
chooses a cache, whose shape the host must know anyway); the prompt row is computed on the
host from the drawn image and template and rides in the step's one upload with the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from engine.errors import UserError
from engine.inversion.buckets import Fit, bucket_sizes, fit, model_step
from engine.inversion.data import LatentCache, encode_images, load_images, mask_weights, templates_for
from engine.inversion.staging import Staging
from engine.settings.data import CAPTION, caption_templates, with_caption
from engine.store import annotations

SQUARE = (0, 0)  # the one "bucket" of a run without --buckets: every image squared at the resolution


@dataclass
class Bucket:
    """Images of one size: their numbers in the run's list, and their latents."""

    size: tuple[int, int]  # (width, height) in pixels
    images: list[int]
    cache: LatentCache
    numbers: torch.Tensor = field(init=False)  # host: `images` as a tensor, for prompt rows

    def __post_init__(self):
        self.numbers = torch.tensor(self.images, dtype=torch.int64)


@dataclass
class RunData:
    buckets: list[Bucket]
    prompt_ids: list[torch.Tensor]  # per text encoder, [P, 77] (per-layer words: [P, L, 77])
    prompts: list[str]  # the P prompts as trained, the word written as the run's token
    templates: int  # T
    per_image: bool  # P = images × T (captions), else P = T
    masked: int  # images with a mask (0 without --masked-loss)
    captioned: int  # images with a caption the prompts use

    @property
    def num_images(self) -> int:
        return sum(len(b.images) for b in self.buckets)

    def draw(self, g: torch.Generator, cfg, b: int, timesteps: int, staging: Staging) -> dict[str, int]:
        """One micro-batch's draws for this run, staged; returns where each is (and its bucket)."""
        number, index = self._images(g, b)
        bucket = self.buckets[number]
        shape = bucket.cache.mean.shape[2:]
        flip = (torch.rand((b,), generator=g) < cfg.flip_p).long()
        template = torch.randint(0, self.templates, (b,), generator=g)
        t = torch.randint(0, timesteps, (b,), generator=g)
        if cfg.fixed_timestep is not None:
            t.fill_(cfg.fixed_timestep)
        posterior_noise = torch.randn((b, *shape), generator=g)
        noise = torch.randn((b, *shape), generator=g)
        if cfg.fixed_noise:
            posterior_noise.zero_()
            noise = torch.randn((b, *shape), generator=torch.Generator().manual_seed(cfg.seed))
        row = bucket.numbers[index] * self.templates + template if self.per_image else template
        drawn = {"index": index, "flip": flip, "template": row, "t": t, "posterior_noise": posterior_noise,
                 "noise": noise, "micro": bucket.cache.micro[index]}  # the size conditioning lives on the host
        return {"bucket": number, **{name: staging.add(value) for name, value in drawn.items()}}

    def _images(self, g: torch.Generator, b: int) -> tuple[int, torch.Tensor]:
        """(bucket, the batch's images within it)."""
        if len(self.buckets) == 1:
            return 0, torch.randint(0, self.num_images, (b,), generator=g)
        lead = int(torch.randint(0, self.num_images, (1,), generator=g))
        number = next(j for j, bucket in enumerate(self.buckets) if lead in bucket.images)
        bucket = self.buckets[number]
        rest = torch.randint(0, len(bucket.images), (b - 1,), generator=g)
        return number, torch.cat([torch.tensor([bucket.images.index(lead)]), rest])

    def cache(self, run: dict) -> LatentCache:
        """The cache a run's draws (`draw`) index: its bucket's (a draw made elsewhere: the first)."""
        return self.buckets[run.get("bucket", 0)].cache

    def describe(self) -> dict:
        """What the run trains on, for its header event and run.json."""
        bucketed = self.buckets[0].size != SQUARE
        return {"images": self.num_images, "masked": self.masked, "captioned": self.captioned,
                "buckets": [{"width": b.size[0], "height": b.size[1], "images": len(b.images)}
                            for b in self.buckets] if bucketed else None}


def build_run_data(inversion, k: int) -> RunData:
    """Run k's data: images, captions and masks read, latents encoded (per bucket), prompts tokenized."""
    slot, cfg = inversion.slots[k], inversion.slots[k].config
    paths = [Path(p) for p in slot.images]
    captions = [_caption(p, cfg.token, inversion.words[k]) for p in paths]
    templates = list(cfg.templates or (caption_templates(templates_for(cfg.property)) if any(captions)
                                       else templates_for(cfg.property)))
    per_image = any(captions) and any(CAPTION in t for t in templates)
    filled = ([with_caption(t, _escaped(c)) for c in captions for t in templates] if per_image
              else [with_caption(t, None) for t in templates])
    word = inversion.words[k]
    if per_image:
        _check_word_fits(inversion.tokenizers[0], filled, word, paths, len(templates))
    images = load_images(paths)
    masks = _masks(paths, images) if cfg.masked_loss else [None] * len(images)
    buckets = _buckets(inversion, cfg, images, masks)
    return RunData(buckets, inversion._tokenize_templates(k, filled),
                   [p.format(cfg.token) for p in filled], len(templates), per_image,
                   sum(m is not None for m in masks), sum(c is not None for c in captions) if per_image else 0)


def _masks(paths: list[Path], images: list[Image.Image]) -> list[Image.Image | None]:
    """Each image's stored mask (checked against the image's size again: it may have been edited)."""
    found = []
    for path, image in zip(paths, images):
        mask = annotations.mask_of(path)
        found.append(annotations.load_mask(mask, image.size, path) if mask else None)
    return found


def _buckets(inversion, cfg, images: list[Image.Image], masks: list) -> list[Bucket]:
    """The images' latent caches: one per bucket with --buckets, else one (SQUARE: as before)."""
    resolution, vae, plan = inversion.resolution, inversion.model.vae, inversion.vae_plan
    groups: dict[tuple[int, int], list[tuple[int, Fit | None]]] = {}
    if cfg.buckets:
        sizes = bucket_sizes(resolution, model_step(inversion.model))
        for i, image in enumerate(images):
            placed = fit(image.width, image.height, sizes)
            groups.setdefault(placed.bucket, []).append((i, placed))
    else:
        groups[SQUARE] = [(i, None) for i in range(len(images))]
    buckets = []
    for size in sorted(groups):
        members = groups[size]
        fits = [f for _, f in members] if cfg.buckets else None
        cache = encode_images(vae, [images[i] for i, _ in members], resolution, cfg.center_crop, plan, fits)
        if cfg.masked_loss:
            latent = tuple(cache.mean.shape[-2:])
            cache.keep_masks([mask_weights(masks[i], latent, resolution, cfg.center_crop, f) for i, f in members])
        buckets.append(Bucket(size, [i for i, _ in members], cache))
    return buckets


def _caption(path: Path, token: str, word: str) -> str | None:
    """An image's caption, the concept's token in it standing for the word (kohya's captions
    name the token; A1111's describe the rest)."""
    caption = annotations.caption_of(path)
    return caption.replace(token, word) if caption and token else caption


def _escaped(caption: str | None) -> str | None:
    """A caption made safe for the templates' `str.format` (its braces are text)."""
    return caption.replace("{", "{{").replace("}", "}}") if caption else caption


def _check_word_fits(tokenizer, prompts: list[str], word: str, paths: list[Path], templates: int) -> None:
    """Refuse a caption so long that it pushes the word past the text encoder's 77 tokens (the
    prompt is cut there: the word would not be trained on it)."""
    slots = set(tokenizer.convert_tokens_to_ids(word.split()))
    limit = tokenizer.model_max_length - 1  # the end-of-text token takes the last place
    for row, prompt in enumerate(prompts):
        ids = tokenizer(prompt.format(word), truncation=False).input_ids
        if max((i for i, t in enumerate(ids) if t in slots), default=limit) >= limit:
            raise UserError(f"the caption of {paths[row // templates].name} pushes the word past the text "
                            f"encoder's {limit + 1} tokens in {prompt[:50]!r}…; shorten the caption or put "
                            "{caption} after {} in the templates")
