"""Prompts -> images: SD alone, SD with learned words (SD+TI), or both side by side.

SD+TI never edits the shared, warm model.  A copy of each tokenizer learns each
concept's token exactly as diffusers' `load_textual_inversion` adds it (same
strings, same order, same ids), and `placeholders_installed` routes those ids to
the learned vectors for the length of the job.  The text encoder therefore sees
the very rows a resized diffusers table would hold, so our images equal what a
plain diffusers pipeline gives after `load_textual_inversion` of the same file
(tests/test_generate.py checks this bit for bit), and afterwards the model is
exactly as it was: same tokenizer, same embedding module.

The pipeline is the model family's (engine.sd.family): `StableDiffusionPipeline`
for SD 1.x/2.x, `StableDiffusionXLPipeline` for SDXL, whose two encoders each
get their block of every learned word.

A per-layer word (P+ / XTI) has a vector set per UNet cross-attention layer: the prompt is
encoded once per layer with that layer's rows live, and engine.sd.per_layer's hook hands
each cross-attention layer its own encoding while the pipeline samples (`_render_layers`);
a plain word in the same prompt is the same in every layer.

Every image is a PNG carrying an A1111-style `parameters` text chunk plus the
full record (JSON) in a `tistudio` chunk and in a sidecar `<name>.json`.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from engine.errors import JobCancelled, UserError
from engine.sd.formats import Embedding, check_fits, embedding_sha256, layer_blocks, read_embedding
from engine.sd.per_layer import sample_per_layer
from engine.sd.placeholder import installed_in_all
from engine.sd.tokenizer import clone_tokenizer
from engine.sd.vae import VaePlan, plan_for, vae_kept
from engine.settings.generate import MODES, GenerateRequest  # noqa: F401 (re-exported)
from engine.settings.samplers import DEFAULT_SAMPLER, get_sampler, make_scheduler
from engine.store.paths import atomic_write_bytes, atomic_write_json, ensure_private_dir
from engine.store.words import (  # noqa: F401 (re-exported for callers of engine.sd.generation)
    BEST,
    FINAL_NAME,
    SAFE_RUN,
    checkpoint_steps,
    choose_embedding,
    done_runs,
    parse_step,
    read_record,
    step_file,
)

SAMPLER = get_sampler(DEFAULT_SAMPLER).label  # previews and evaluations sample with the default
GENERATOR = "torch.Generator('cpu').manual_seed(seed), one per image"

Progress = Callable[[str, float], None]
Cancelled = Callable[[], bool]


# --- sampling core ----------------------------------------------------------------------------


def generation_scheduler(model, name: str | None = None):
    """The sampler `name` (default DPM++ 2M), built from the model's own noise schedule."""
    return make_scheduler(name, model.pipe.scheduler.config)


def _pipeline_with(model, scheduler, tokenizers=None):
    """The family's pipeline over the shared components, with its own scheduler (and tokenizers, for TI)."""
    return model.family.pipeline(model, scheduler, tokenizers or [tok for _, tok in model.encoders])


def _generators(seeds: list[int]) -> list[torch.Generator]:
    # CPU generators: a seed gives the same starting noise on every device.
    return [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]


@torch.no_grad()
def sample_prompt(model, prompt: str, tokenizers: list, seeds: list[int], steps: int = 25, guidance: float = 7.5,
                  negative_prompt: str = "", resolution: int | None = None):
    """One image per seed for `prompt`, tokenized by `tokenizers` (one per encoder): training
    previews, where the tokenizers know the run's slot tokens and the rows are installed."""
    pipe = _pipeline_with(model, generation_scheduler(model), tokenizers)
    size = resolution or model.info.resolution
    with vae_kept(model.vae, plan_for(model, size, size, len(seeds))):
        return pipe(
            prompt=[prompt] * len(seeds), negative_prompt=_negatives(negative_prompt, len(seeds)),
            num_inference_steps=steps, guidance_scale=guidance, generator=_generators(seeds), height=size,
            width=size, output_type="pil",
        ).images


@torch.no_grad()
def sample_prompts(model, pairs: list[tuple[str, int]], tokenizers: list, steps: int = 25, guidance: float = 7.5):
    """One image per (prompt, seed) pair, several prompts in one pipeline call (`default_batch` at a
    time): the training probes' images, each from its seed's own noise as in `sample_prompt`."""
    pipe = _pipeline_with(model, generation_scheduler(model), tokenizers)
    size, images = model.info.resolution, []
    chunk = default_batch(size, size)
    for start in range(0, len(pairs), chunk):
        part = pairs[start : start + chunk]
        with vae_kept(model.vae, plan_for(model, size, size, len(part))):
            images += pipe(
                prompt=[p for p, _ in part], num_inference_steps=steps, guidance_scale=guidance,
                generator=_generators([s for _, s in part]), height=size, width=size, output_type="pil",
            ).images
    return images


@torch.no_grad()
def sample_images(model, prompt_embeds: torch.Tensor, seeds: list[int], steps: int = 25, guidance: float = 7.5,
                  negative_prompt: str = "", resolution: int | None = None):
    """One image per seed from precomputed SD 1.x/2.x prompt embeddings ([1 or N, 77, dim])."""
    pipe = _pipeline_with(model, generation_scheduler(model))
    if prompt_embeds.shape[0] == 1 and len(seeds) > 1:
        prompt_embeds = prompt_embeds.expand(len(seeds), -1, -1)
    size = resolution or model.info.resolution
    with vae_kept(model.vae, plan_for(model, size, size, len(seeds))):
        return pipe(
            prompt_embeds=prompt_embeds.to(model.dtype), negative_prompt=_negatives(negative_prompt, len(seeds)),
            num_inference_steps=steps, guidance_scale=guidance, generator=_generators(seeds), height=size,
            width=size, output_type="pil",
        ).images


def _negatives(negative: str, n: int) -> list[str] | None:
    """None for no negative prompt, as diffusers' own default: SDXL then conditions on zeros
    (`force_zeros_for_empty_prompt`), where "" would encode the empty string; SD 1.x/2.x
    encode "" either way."""
    return [negative] * n if negative else None


# --- which learned words a prompt uses ----------------------------------------------------------


@dataclass
class UsedEmbedding:
    """One learned word a generation used: where it came from and what it was."""

    concept: str
    token: str
    run: str
    step: int | None  # the training step of the vectors; None if the run does not say
    final: bool  # the run's final embedding (not a numbered checkpoint)
    path: Path
    sha256: str  # embedding_sha256 of the vectors: the same whatever the file format
    description: str
    vectors: torch.Tensor = field(repr=False)  # encoder 1's [n, width] block
    vectors_2: torch.Tensor | None = field(default=None, repr=False)  # SDXL: encoder 2's block
    layers: tuple[str, ...] = ()  # a per-layer word's layers (vectors: [L*n, width], layer-major)

    @property
    def blocks(self) -> tuple[torch.Tensor, ...]:
        """One [n, width] block per text encoder (SDXL: clip_l, clip_g)."""
        return (self.vectors,) if self.vectors_2 is None else (self.vectors, self.vectors_2)

    def to_dict(self) -> dict:
        return {
            "concept": self.concept, "token": self.token, "run": self.run, "step": self.step,
            "final": self.final, "path": str(self.path), "sha256": self.sha256, "description": self.description,
            "vectors": int(self.vectors.shape[0]) // max(1, len(self.layers)),
            **({"layers": len(self.layers)} if self.layers else {}),
        }

    @property
    def ref(self) -> str:
        """The --use string that picks exactly these vectors again."""
        return f"{self.concept}@{self.run}" + ("" if self.final else f":{self.step}")


_USE = re.compile(r"^(?P<name>.+?)(?:@(?P<run>[^@:]*))?(?::(?P<step>[^@:]*))?$")


def parse_use(spec: str, library=None) -> tuple[str, str | None, int | str | None]:
    """`NAME[@RUN][:STEP]` -> (name, run or None, step or None); STEP may be `best` (the run's best
    probed step, engine.store.words.BEST)."""
    if not isinstance(spec, str) or not spec.strip():
        raise UserError("--use is empty; write NAME, NAME@RUN or NAME@RUN:STEP")
    spec = spec.strip()
    if library is not None and library.exists(spec):
        return spec, None, None  # a concept whose name holds '@' or ':'
    match = _USE.match(spec)
    name, run, step = match.group("name"), match.group("run"), match.group("step")
    if run is not None and not SAFE_RUN.match(run):
        raise UserError(f"--use {spec}: {run!r} is not a run id; write NAME@RUN:STEP (see `tistudio runs`)")
    if step is not None and not step.isdigit() and step.lower() != BEST:
        raise UserError(f"--use {spec}: step {step!r} is not a number; write NAME@RUN:STEP, e.g. {name}@RUN:500, "
                        f"or {name}@RUN:best")
    return name, run, None if step is None else parse_step(step)


def token_spans(text: str, concepts) -> list[tuple[int, int, object]]:
    """Where concept tokens occur in `text`: (start, end, concept).

    Matches the way the tokenizer finds added tokens: anywhere, ignoring case,
    longest token first, without overlaps.
    """
    by_length = sorted(concepts, key=lambda c: -len(c.token))
    spans, i = [], 0
    while i < len(text):
        for concept in by_length:
            end = i + len(concept.token)
            if text[i:end].lower() == concept.token.lower():
                spans.append((i, end, concept))
                i = end
                break
        else:
            i += 1
    return spans


def concepts_in(text: str, concepts) -> list:
    """Concepts whose token appears in `text`, in order of first appearance."""
    found = []
    for _, _, concept in token_spans(text, concepts):
        if concept.name not in [c.name for c in found]:
            found.append(concept)
    return found


def with_descriptions(text: str, concepts) -> str:
    """SD-only prompts: each concept token replaced by the concept's description."""
    out, last = [], 0
    for start, end, concept in token_spans(text, concepts):
        out += [text[last:start], concept.description]
        last = end
    return "".join(out + [text[last:]])


def resolve_embeddings(library, prompt: str, uses: list[str]) -> list[UsedEmbedding]:
    """The learned words `prompt` uses: a concept's latest finished run unless a --use picks one."""
    picked: dict[str, tuple[str | None, int | None]] = {}
    for spec in uses or []:
        name, run, step = parse_use(spec, library)
        concept = library.get(name)
        if concept.name in picked:
            raise UserError(f"--use names concept {concept.name!r} twice; keep one")
        picked[concept.name] = (run, step)
    found = concepts_in(prompt, library.list())
    for name in picked:
        if name not in [c.name for c in found]:
            token = library.get(name).token
            raise UserError(f"--use {name}: its token {token} is not in the prompt; put {token} where the concept goes")
    return [load_used(c, *picked.get(c.name, (None, None))) for c in found]


def load_used(concept, run: str | None = None, step: int | str | None = None, option: str = "use") -> UsedEmbedding:
    """The vectors of `concept` from run `run` (latest finished) at `step` (final; `best`: its best probed step)."""
    choice = choose_embedding(concept, run, step, option)
    emb = read_embedding(choice.path)
    return UsedEmbedding(
        concept=concept.name, token=concept.token, run=choice.run, step=choice.step, final=choice.final,
        path=choice.path, sha256=embedding_sha256(emb.blocks), description=concept.description, vectors=emb.vectors,
        vectors_2=emb.vectors_2, layers=emb.layers,
    )


# --- the learned words inside a pipeline ---------------------------------------------------------


def _tokenizers_with(model, used: list[UsedEmbedding]) -> tuple[list, list[torch.Tensor] | None]:
    """Per text encoder: a tokenizer copy that knows the tokens, and their rows in id order
    ([R, width]; when a word is per-layer, [L, R, width]: a plain word's rows in every layer).

    Token names follow diffusers: an n-vector embedding is `tok`, `tok_1` ... `tok_{n-1}`,
    and the pipeline's `maybe_convert_prompt` expands `tok` in prompts to all of them.
    SDXL's two tokenizers learn the same names; each encoder gets its own block's rows.
    """
    encoders = model.encoders
    if not used:
        return [tok for _, tok in encoders], None
    for u in used:
        check_fits(Embedding(u.vectors, u.token, "diffusers", meta={"path": str(u.path)}, vectors_2=u.vectors_2,
                             layers=u.layers), model.info)
    count = max(len(u.layers) for u in used) or 1
    tokenizers, tables = [], []
    for e, (_, original) in enumerate(encoders):
        tokenizer = clone_tokenizer(original)
        base, taken = len(tokenizer), set(tokenizer.get_vocab())
        rows: list[torch.Tensor] = []
        for u in used:
            block = layer_blocks(u.blocks[e], u.layers).expand(count, -1, -1)  # [L, n, width]
            names = [u.token] + [f"{u.token}_{i}" for i in range(1, block.shape[1])]
            for name, row in zip(names, block.unbind(1)):
                if name in taken:
                    raise UserError(
                        f"token {name} is already a word of this model; give concept {u.concept!r} another token"
                    )
                taken.add(name)
                tokenizer.add_tokens(name)
                if tokenizer.convert_tokens_to_ids(name) != base + len(rows):
                    raise RuntimeError(f"token {name} did not get the next free id")
                rows.append(row)
        tokenizers.append(tokenizer)
        tables.append(torch.stack(rows, dim=1) if count > 1 else torch.stack(rows)[:, 0])
    return tokenizers, tables


def _installed(model, tables: list[torch.Tensor] | None):
    if tables is None:
        return contextlib.nullcontext()
    return installed_in_all(model.encoders, [t.to(model.device) for t in tables])


def default_batch(width: int, height: int) -> int:
    """Images sampled at once when none is asked for: 4 at SD 1.x's 512 px (64x64 latents), and
    as many as fit in the same latent pixels at a smaller size, up to 16.  A small model at 32 px
    is bound by per-call overhead, not memory: 16 at once is about twice as fast as 4."""
    latent_pixels = max(1, (width // 8) * (height // 8))
    return max(4, min(16, 4 * 64 * 64 // latent_pixels))


@torch.no_grad()
def render(model, prompt: str, seeds: list[int], *, negative: str = "", steps: int = 25, guidance: float = 7.5,
           resolution: int | None = None, batch_size: int | None = None, used: list[UsedEmbedding] = (),
           output_type: str = "pil", progress: Progress | None = None, cancelled: Cancelled | None = None,
           sampler: str | None = None, width: int | None = None, height: int | None = None,
           vae_plan: VaePlan | None = None) -> list:
    """One image per seed, `batch_size` at a time (default: `default_batch`); `used` words are
    live only inside this call.  The VAE decodes as `vae_plan` says (default: engine.sd.vae's
    plan for the memory free now), and ends the call as it began, whatever happens."""
    tokenizers, tables = _tokenizers_with(model, list(used))
    pipe = _pipeline_with(model, generation_scheduler(model, sampler), tokenizers)
    size = resolution or model.info.resolution
    width, height = width or size, height or size
    batch_size = batch_size or default_batch(width, height)
    vae_plan = vae_plan or plan_for(model, width, height, batch_size)
    total, images = len(seeds) * steps, []

    def on_step(_pipe, i, _t, kwargs):
        if cancelled and cancelled():
            raise JobCancelled("generation cancelled")
        if progress:
            progress("sampling", (len(images) * steps + (i + 1) * len(chunk)) / total)
        return kwargs

    per_layer = tables is not None and tables[0].dim() == 3
    with (contextlib.nullcontext() if per_layer else _installed(model, tables)), vae_kept(model.vae, vae_plan), \
            _layer_hook(model, per_layer) as hook:
        embeds = _layer_embeds(model, pipe, tables, prompt, negative, guidance) if per_layer else None
        for start in range(0, len(seeds), batch_size):
            if cancelled and cancelled():
                raise JobCancelled("generation cancelled")
            chunk = seeds[start : start + batch_size]
            call = dict(num_inference_steps=steps, guidance_scale=guidance, generator=_generators(chunk),
                        height=height, width=width, output_type=output_type, callback_on_step_end=on_step)
            if per_layer:
                out = sample_per_layer(pipe, hook, *embeds, len(chunk), **call)
            else:
                out = pipe(prompt=prompt, negative_prompt=negative or None, num_images_per_prompt=len(chunk), **call)
            images.extend(list(out.images))
    return images


@contextlib.contextmanager
def _layer_hook(model, per_layer: bool):
    """engine.sd.per_layer's hook on the UNet's cross-attention layers, for a per-layer word."""
    if not per_layer:
        yield None
        return
    from engine.sd.per_layer import LayerStates, unet_layers

    with LayerStates(model.unet, unet_layers(model)).installed() as hook:
        yield hook


def _layer_embeds(model, pipe, tables: list[torch.Tensor], prompt: str, negative: str, guidance: float):
    """The prompt encoded once per layer, each time with that layer's rows ([L, R, width] per
    encoder) live: ([L, 1, 77, D], and the negative's with guidance, else None)."""
    current = [0]
    rows = [lambda e=e: tables[e][current[0]].to(model.device) for e in range(len(tables))]
    cond, uncond = [], []
    with installed_in_all(model.encoders, rows):
        for layer in range(tables[0].shape[0]):
            current[0] = layer
            positive, negative_embeds = pipe.encode_prompt(prompt, model.device, 1, guidance > 1,
                                                           negative_prompt=negative or None)
            cond.append(positive)
            uncond.append(negative_embeds)
    return torch.stack(cond), (torch.stack(uncond) if guidance > 1 else None)


@torch.no_grad()
def sample_layer_prompts(model, prompts: list[str], tokenizers: list, hook, seeds: list[int], steps: int = 25,
                         guidance: float = 7.5, negative_prompt: str = "", resolution: int | None = None):
    """`sample_prompt` for a per-layer word being trained: prompts[l] holds layer l's slot word
    (their rows are installed, and `hook` on the UNet, by the training run)."""
    pipe = _pipeline_with(model, generation_scheduler(model), tokenizers)
    size = resolution or model.info.resolution
    pairs = [pipe.encode_prompt(p, model.device, 1, guidance > 1, negative_prompt=negative_prompt or None)
             for p in prompts]
    cond = torch.stack([c for c, _ in pairs])
    uncond = torch.stack([u for _, u in pairs]) if guidance > 1 else None
    with vae_kept(model.vae, plan_for(model, size, size, len(seeds))):
        return sample_per_layer(pipe, hook, cond, uncond, len(seeds), num_inference_steps=steps,
                                guidance_scale=guidance, generator=_generators(seeds), height=size, width=size,
                                output_type="pil").images


# --- requests, files and metadata ------------------------------------------------------------------


def timestamp_id() -> str:
    """UTC time then randomness, e.g. 20261126-031500-ab12: sorts by creation."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(2)


def slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower())[:limit].strip("-") or "image"


def new_output_dir(home: Path, prompt: str) -> Path:
    root = ensure_private_dir(Path(home) / "outputs")
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    for n in range(1, 1000):
        path = root / (f"{stamp}-{slug(prompt)}" + (f"-{n}" if n > 1 else ""))
        try:
            path.mkdir(mode=0o700)
            return path
        except FileExistsError:
            continue
    raise UserError(f"too many outputs named {stamp}-{slug(prompt)}; pass --out")


def image_record(model, *, mode: str, prompt: str, negative: str, seed: int, steps: int, guidance: float,
                 size: int, used: list[UsedEmbedding], batch_size: int = 1, sampler: str | None = None,
                 width: int | None = None, height: int | None = None, vae: dict | None = None) -> dict:
    """Everything needed to make the image again (batch size too: batched kernels may round
    differently; and `vae`, how the VAE decoded it: engine.sd.vae.VaePlan.decoding)."""
    chosen = get_sampler(sampler)
    return {
        "prompt": prompt, "negative_prompt": negative, "seed": seed, "steps": steps, "guidance": guidance,
        "batch_size": batch_size, "sampler": chosen.label, "sampler_name": chosen.name,
        "scheduler": chosen.describe(), "generator": GENERATOR, "width": width or size, "height": height or size,
        "mode": mode, "model": model.info.identity(), "dtype": str(model.dtype).replace("torch.", ""),
        "embeddings": [u.to_dict() for u in used], **({"vae": vae} if vae else {}),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _a1111_value(value) -> str:
    text = str(value)
    return json.dumps(text) if any(c in text for c in ',"\n') else text


def a1111_parameters(record: dict) -> str:
    """The `parameters` text A1111 writes (and Civitai, ComfyUI readers parse)."""
    lines = [record["prompt"]]
    if record["negative_prompt"]:
        lines.append(f"Negative prompt: {record['negative_prompt']}")
    model = record["model"]
    fields = [
        ("Steps", record["steps"]), ("Sampler", record["sampler"]), ("CFG scale", f"{record['guidance']:g}"),
        ("Seed", record["seed"]), ("Size", f"{record['width']}x{record['height']}"),
        ("Model hash", model["fingerprint"][:10]), ("Model", _a1111_value(model["spec"])),
    ]
    used = record["embeddings"]
    if used:
        fields.append(("TI hashes", json.dumps(", ".join(f"{e['token']}: {e['sha256'][:12]}" for e in used))))
        runs = ", ".join(
            f"{e['token']}: {e['concept']}@{e['run']}:{'final' if e['final'] else e['step']}" for e in used
        )
        fields.append(("TI runs", json.dumps(runs)))
    fields.append(("Version", "tistudio"))
    lines.append(", ".join(f"{k}: {v}" for k, v in fields))
    return "\n".join(lines)


def write_image(path: Path, image, record: dict) -> Path:
    """PNG with metadata chunks, sidecar JSON first (so a visible PNG always has its record)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", a1111_parameters(record))
    info.add_text("tistudio", json.dumps(record, sort_keys=True))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    atomic_write_json(path.with_suffix(".json"), record)
    atomic_write_bytes(path, buf.getvalue())
    return path


def sub_progress(progress: Progress | None, start: float, span: float) -> Progress | None:
    """Report a part of a job as [start, start + span] of the whole."""
    if progress is None:
        return None
    return lambda msg, f: progress(msg, start + span * f)


def generate(model, library, request: GenerateRequest, progress: Progress | None = None,
             cancelled: Cancelled | None = None) -> list[dict]:
    """Render the request and write the images; one dict per image: path, json, prompt, seed, mode."""
    request.validate()
    concepts = library.list()
    # Resolve every learned word before the first image, so a mistake costs nothing.
    jobs = []
    for mode in (["sd", "ti"] if request.mode == "compare" else [request.mode]):
        if mode == "sd":
            jobs.append((mode, with_descriptions(request.prompt, concepts),
                         with_descriptions(request.negative, concepts), []))
        else:
            used = resolve_embeddings(library, f"{request.prompt}\n{request.negative}", request.uses)
            jobs.append((mode, request.prompt, request.negative, used))
    out_dir = Path(request.out_dir) if request.out_dir else new_output_dir(library.home, request.prompt)
    size = request.resolution or model.info.resolution
    width, height = request.width or size, request.height or size
    b = request.batch_size or default_batch(width, height)
    vae_plan = plan_for(model, width, height, b)  # one plan for the whole request, in every record
    results, rendered = [], {}
    for k, (mode, prompt, negative, used) in enumerate(jobs):
        images = render(
            model, prompt, request.seeds, negative=negative, steps=request.steps, guidance=request.guidance,
            resolution=size, batch_size=b, used=used,
            progress=sub_progress(progress, k / len(jobs), 1 / len(jobs)), cancelled=cancelled,
            sampler=request.sampler, width=request.width, height=request.height, vae_plan=vae_plan,
        )
        rendered[mode] = images
        for i, (seed, image) in enumerate(zip(request.seeds, images)):
            batch = min(b, request.n - i // b * b)  # the size of the batch this image was drawn in
            record = image_record(model, mode=mode, prompt=prompt, negative=negative, seed=seed,
                                  steps=request.steps, guidance=request.guidance, size=size, used=used,
                                  batch_size=batch, sampler=request.sampler, width=request.width,
                                  height=request.height, vae=vae_plan.decoding())
            path = write_image(out_dir / f"{mode}-{seed:04d}.png", image, record)
            results.append({"path": str(path), "json": str(path.with_suffix(".json")), "prompt": prompt,
                            "seed": seed, "mode": mode})
    if request.mode == "compare":
        labels = [f"SD {s}" for s in request.seeds] + [f"SD+TI {s}" for s in request.seeds]
        grid = make_grid(rendered["sd"] + rendered["ti"], 2, request.n, labels)
        save_png(out_dir / "compare.png", grid)
    if progress:
        progress("done", 1.0)
    return results


# --- grids -----------------------------------------------------------------------------------------


def save_png(path: Path, image) -> Path:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _fit(draw, text: str, font, width: int) -> str:
    """Shorten `text` with an ellipsis until it fits in `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def make_grid(images: list, rows: int, cols: int, labels: list[str] | None = None, *,
              row_labels: list[str] | None = None, col_labels: list[str] | None = None, pad: int = 4):
    """Images in a rows x cols grid (row-major) on white, with optional captions.

    labels: one caption under each image; row_labels / col_labels: a left column / header row.
    """
    from PIL import Image, ImageDraw

    if len(images) > rows * cols:
        raise ValueError(f"{len(images)} images do not fit a {rows}x{cols} grid")
    w, h = images[0].size if images else (64, 64)
    font = _font(max(10, h // 14))
    line = font.getbbox("Ag")[3] + 4
    cap = line if labels else 0
    top = line + pad if col_labels else 0
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left = 0
    if row_labels:
        left = min(int(max(probe.textlength(t, font=font) for t in row_labels)) + 2 * pad, 2 * w)
    grid = Image.new("RGB", (left + cols * (w + pad) + pad, top + rows * (h + cap + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for c, text in enumerate(col_labels or []):
        draw.text((left + pad + c * (w + pad), pad // 2), _fit(draw, text, font, w), fill="black", font=font)
    for r, text in enumerate(row_labels or []):
        y = top + pad + r * (h + cap + pad) + h // 2 - line // 2
        draw.text((pad, y), _fit(draw, text, font, left - 2 * pad), fill="black", font=font)
    for i, image in enumerate(images):
        r, c = divmod(i, cols)
        x, y = left + pad + c * (w + pad), top + pad + r * (h + cap + pad)
        grid.paste(image.convert("RGB").resize((w, h)) if image.size != (w, h) else image.convert("RGB"), (x, y))
        if labels and i < len(labels):
            draw.text((x, y + h + 2), _fit(draw, labels[i], font, w), fill="black", font=font)
    return grid
