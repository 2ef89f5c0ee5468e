"""concept add|list|show|rm|rename, import, export: the library, in-process (no engine needed)."""

from __future__ import annotations

from pathlib import Path

from tistudio.commands.args import float_list, positive_int, saved_step
from tistudio.commands.output import home, print_json, print_table


def add_commands(sub) -> None:
    concept = sub.add_parser("concept", help="the concept library").add_subparsers(dest="action", metavar="ACTION",
                                                                                   required=True)
    p = concept.add_parser("add", help="create a concept from a folder of images")
    p.add_argument("name")
    p.add_argument("--images", required=True, help="folder of 3-5 training images")
    p.add_argument("--init", required=True, help="initializer: one word the model knows (a single token)")
    p.add_argument("--token", help="the new word (default: <NAME>)")
    p.add_argument("--style", action="store_true", help="the concept is a style, not an object")
    p.add_argument("--description", help="words the SD baseline uses instead of the token (default: the init word)")
    _annotation_options(p)
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.set_defaults(func=concept_add)

    p = concept.add_parser("list", help="list concepts")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.set_defaults(func=concept_list)

    p = concept.add_parser("show", help="one concept, its images and runs")
    p.add_argument("name")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.set_defaults(func=concept_show)

    p = concept.add_parser("rm", help="delete a concept, its images and runs")
    p.add_argument("name")
    p.add_argument("--yes", action="store_true", help="really delete (required)")
    p.set_defaults(func=concept_rm)

    images = concept.add_parser("images", help="add or remove a concept's training images").add_subparsers(
        dest="images_action", metavar="ACTION", required=True)
    p = images.add_parser("add", help="copy image files (or folders of them) into the concept")
    p.add_argument("name", help="the concept")
    p.add_argument("files", nargs="+", metavar="FILE", help="image files or folders")
    p.add_argument("--caption", help="the caption of the image(s) added (default: a caption file beside each)")
    _annotation_options(p)
    p.set_defaults(func=concept_images_add)
    p = images.add_parser("caption", help="set (or, with no TEXT, remove) a training image's caption")
    p.add_argument("name", help="the concept")
    p.add_argument("image", metavar="IMAGE", help="a stored image name, e.g. 003.png (see `concept show`)")
    p.add_argument("text", nargs="?", default="", metavar="TEXT", help="the caption (at most 1,000 characters)")
    p.set_defaults(func=concept_images_caption)
    p = images.add_parser("rm", help="delete training images by their stored name (see `concept show`)")
    p.add_argument("name", help="the concept")
    p.add_argument("files", nargs="+", metavar="IMAGE", help="stored image names, e.g. 003.png")
    p.set_defaults(func=concept_images_rm)

    p = concept.add_parser("inspect", help="see the learned word: norms against the vocabulary, cosine to the "
                                           "initializer, nearest tokens, and how the concept's runs compare")
    p.add_argument("name", metavar="NAME[@RUN[:STEP]]", help="a concept, or one of its saved words")
    p.add_argument("--top", type=positive_int, default=10, help="nearest vocabulary tokens to list per vector")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.set_defaults(func=concept_inspect)

    p = concept.add_parser("rename", help="rename a concept (its runs come along)")
    p.add_argument("old")
    p.add_argument("new")
    p.set_defaults(func=concept_rename)

    p = sub.add_parser("import", help="import an embedding file as a concept (diffusers, A1111, kohya, OneTrainer, "
                                      "kohya XTI per-layer words)")
    p.add_argument("file")
    p.add_argument("--name", help="concept name (default: from the file)")
    p.add_argument("--token", help="the word in prompts (default: from the file, or <NAME>)")
    p.add_argument("--description", help="words the SD baseline uses instead of the token (default: the name)")
    p.add_argument("--style", action="store_true", help="the concept is a style, not an object")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.set_defaults(func=import_embedding)

    p = sub.add_parser("merge", help="a new concept from a weighted mix (or concatenation) of learned words")
    p.add_argument("sources", nargs="+", metavar="NAME[@RUN[:STEP]]|FILE", help="two or more words of one family")
    p.add_argument("--name", required=True, help="the new concept's name")
    p.add_argument("--weights", type=float_list, help="one weight per source, e.g. 0.7,0.3 (default: equal)")
    p.add_argument("--concat", action="store_true",
                   help="join the words instead: a word of all their vectors, in order")
    p.add_argument("--token", help="the new word (default: <NAME>)")
    p.add_argument("--description", help="words the SD baseline uses instead of the token (default: the name)")
    p.add_argument("--style", action="store_true", help="the concept is a style, not an object")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.set_defaults(func=merge_words)

    p = sub.add_parser("export", help="write a concept's embedding for other tools")
    p.add_argument("name")
    p.add_argument("--run", help="run id (default: the latest finished run)")
    p.add_argument("--step", type=saved_step,
                   help="a saved step, or best (the run's best probed step); default: the final embedding")
    p.add_argument("--format", default="diffusers",
                   choices=("diffusers", "a1111", "kohya", "comfy", "a1111-png", "kohya-xti"),
                   help="diffusers (SDXL: two files, X and X_2), a1111, kohya, comfy (SDXL: clip_l + clip_g), "
                        "a1111-png (A1111's PNG card: the run's latest preview, else the first training image, "
                        "with the embedding in its text chunk and its pixels), kohya-xti (a per-layer word: "
                        "kohya's XTI keys IN01…OUT11; the one format that holds one)")
    p.add_argument("--out", required=True, help="output file")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    p.set_defaults(func=export_embedding)


def _annotation_options(p) -> None:
    """Where an image's caption and mask come from (engine.store.annotations: kohya's layout)."""
    p.add_argument("--caption-ext", default=".txt", metavar="EXT",
                   help="captions are files beside the images with this extension (default: .txt; kohya's "
                        "own default is .caption); the first line is the caption")
    p.add_argument("--masks", metavar="DIR",
                   help="a folder of loss masks named as the images (white trains, black is ignored; the R "
                        "channel is read); without it an image's transparency is its mask (see train --masked-loss)")


def _library():
    from engine.store.library import Library

    return Library(home())


def _tokenizer():
    from engine.sd.models import load_tokenizer

    return load_tokenizer()


def concept_add(args) -> int:
    concept = _library().add(
        args.name, Path(args.images), args.init, token=args.token,
        property="style" if args.style else "object", description=args.description, tokenizer=_tokenizer(),
        masks=args.masks, caption_ext=args.caption_ext,
    )
    if args.json:
        print_json(concept.to_dict())
    else:
        print(f"added {concept.name}: token {concept.token}, init {concept.init!r}, {len(concept.images)} images"
              f"{_annotated(concept.images)}")
    return 0


def _annotated(images) -> str:
    """" (2 with a caption, 1 with a mask)", or "" when none has either."""
    from engine.store.annotations import captions_of, mask_of

    captions, masks = len(captions_of(images)), sum(mask_of(p) is not None for p in images)
    parts = [f"{captions} with a caption" if captions else "", f"{masks} with a mask" if masks else ""]
    return f" ({', '.join(p for p in parts if p)})" if captions or masks else ""


def _concept_row(summary) -> dict:
    data = summary.concept.to_dict()
    data["runs"] = len(summary.runs)
    return data


def concept_list(args) -> int:
    from engine.store.records import library_summaries

    rows = [_concept_row(s) for s in library_summaries(home())]
    if args.json:
        print_json(rows)
        return 0
    if not rows:
        print("no concepts yet; add one with `tistudio concept add NAME --images DIR --init WORD`")
        return 0
    print_table("concepts", ["name", "token", "init", "property", "images", "runs", "description"],
                [[r["name"], r["token"], r["init"], r["property"], r["images"], r["runs"], r["description"]]
                 for r in rows])
    return 0


def concept_show(args) -> int:
    from engine.store.records import summarize

    summary = summarize(_library().get(args.name))
    data = summary.concept.to_dict()
    data["image_files"] = [str(p) for p in summary.images]
    data["captions"], data["masks"] = _annotations(summary.images)
    data["runs"] = [{k: r.get(k) for k in ("id", "kind", "status", "step", "steps", "embedding")}
                    for r in summary.runs]
    if args.json:
        print_json(data)
        return 0
    for key in ("name", "token", "init", "property", "description", "created", "path"):
        print(f"{key:12} {data[key]}")
    print(f"{'images':12} {len(data['image_files'])}: {', '.join(Path(p).name for p in data['image_files'])}")
    for name in sorted(set(data["captions"]) | set(data["masks"])):
        mask = " [mask]" if name in data["masks"] else ""
        print(f"{'':12} {name}{mask}  {data['captions'].get(name, '')}".rstrip())
    if data["runs"]:
        rows = [[r["id"], r["kind"], r["status"], f"{r['step']}/{r['steps']}", r["embedding"]] for r in data["runs"]]
        print_table("runs", ["id", "kind", "status", "step", "embedding"], rows)
    return 0


def _annotations(images) -> tuple[dict, dict]:
    """({image name: caption}, {image name: mask file}) of the images that have them."""
    from engine.store.annotations import captions_of, mask_of

    return captions_of(images), {p.name: str(mask_of(p)) for p in images if mask_of(p) is not None}


def concept_rm(args) -> int:
    from engine.errors import UserError

    library = _library()
    concept = library.get(args.name)
    if not args.yes:
        raise UserError(f"deleting {concept.name!r} removes its images and runs; add --yes to confirm")
    library.delete(concept.name)
    print(f"deleted {concept.name}")
    return 0


def concept_images_add(args) -> int:
    library = _library()
    written = library.add_images(args.name, [Path(f) for f in args.files], caption=args.caption,
                                 caption_ext=args.caption_ext, masks=args.masks)
    total = len(library.get(args.name).images)
    print(f"added {len(written)} image(s) to {args.name}: {', '.join(p.name for p in written)} ({total} in all)"
          f"{_annotated(written)}")
    return 0


def concept_images_caption(args) -> int:
    caption = _library().set_caption(args.name, args.image, args.text)
    print(f"{args.name} {args.image}: " + (f"caption {caption!r}" if caption else "no caption"))
    return 0


def concept_images_rm(args) -> int:
    library = _library()
    removed = library.remove_images(args.name, args.files)
    left = len(library.get(args.name).images)
    print(f"removed {', '.join(p.name for p in removed)} from {args.name} ({left} left)")
    return 0


def concept_inspect(args) -> int:
    from engine.sd.generation import parse_use
    from engine.store.words import choose_embedding
    from tistudio.commands.job_cmds import _model_param, run_job

    library = _library()
    name, run, step = parse_use(args.name, library)
    choose_embedding(library.get(name), run, step)  # nothing trained, or no such step: say so now
    params = {"run": run, "step": step, "top": args.top, **_model_param()}
    report = run_job("inspect", name, params, quiet=True)
    if args.json:
        print_json(report)
    else:
        print(inspect_text(report))
    return 0


def inspect_text(report: dict) -> str:
    """The inspector's report for people."""
    where = "final" if report["final"] else f"step {report['step']}"
    lines = [f"{report['token']}  {report['concept']}@{report['run']} ({where}), {report['family']}, "
             f"{report['vectors']} vector(s) per text encoder"
             + (f" in each of {len(report['layers'])} UNet layers (per-layer)" if report.get("layers") else "")]
    for enc in report["encoders"]:
        vocab = enc["vocab"]
        lines.append(f"{enc['name']} ({enc['width']} wide): vocabulary norms median {vocab['median']:.3f}, "
                     f"5-95% {vocab['p05']:.3f}-{vocab['p95']:.3f}, max {vocab['max']:.3f}")
        for v in enc["vectors"]:
            init = (f"; cosine to the initializer {v['init_token']!r} {v['cos_init']:.3f}"
                    if v["init_token"] is not None else "")
            layer = f" ({v['layer']})" if v.get("layer") else ""
            lines.append(f"  vector {v['index']}{layer}: norm {v['norm']:.3f} ({v['norm_vs_median']:.1f}x the median, "
                         f"above {v['norm_percentile']:.1f}% of the vocabulary){init}")
            lines.append("    nearest: " + ", ".join(f"{n['token']} {n['cos']:.2f}" for n in v["nearest"]))
    runs = report["runs"]
    if len(runs["ids"]) > 1:
        lines.append(f"runs of {report['concept']}: cosine between their words (1.0: the same word)")
        width = max(len(i) for i in runs["ids"])
        lines.append(" " * (width + 2) + "  ".join(f"{k:>6}" for k in range(len(runs["ids"]))))
        for k, (run_id, row) in enumerate(zip(runs["ids"], runs["cosine"])):
            cells = "  ".join("   n/a" if c is None else f"{c:6.3f}" for c in row)
            lines.append(f"{run_id:<{width}}  {cells}   [{k}] {runs['labels'][k]}")
    return "\n".join(lines)


def merge_words(args) -> int:
    from engine.inversion.merge import merge

    result = merge(_library(), args.sources, name=args.name, weights=args.weights, concatenate=args.concat,
                   token=args.token, description=args.description, property="style" if args.style else "object")
    if args.json:
        print_json({**result.concept.to_dict(), "run": result.run, "vectors": result.vectors,
                    "family": result.family})
    else:
        how = "joined" if args.concat else "mixed"
        print(f"{how} {', '.join(args.sources)} into concept {result.concept.name} (token {result.concept.token}, "
              f"{result.vectors} vector(s), {result.family}, run {result.run})")
    return 0


def concept_rename(args) -> int:
    concept = _library().rename(args.old, args.new)
    print(f"renamed {args.old} to {concept.name} (token {concept.token})")
    return 0


def import_embedding(args) -> int:
    from engine.inversion.importing import import_embedding

    result = import_embedding(
        _library(), Path(args.file), name=args.name, token=args.token, description=args.description,
        property="style" if args.style else "object",
    )
    concept, run_id = result.concept, result.run
    if args.json:
        print_json({**concept.to_dict(), "run": run_id, "vectors": result.vectors, "notes": result.notes})
    else:
        print(f"imported {args.file} as concept {concept.name} (token {concept.token}, run {run_id}, "
              f"{result.vectors} vector{'s' if result.vectors != 1 else ''})")
        for note in result.notes:
            print(f"note: {note}")
    return 0


def export_embedding(args) -> int:
    from engine.errors import UserError
    from engine.sd.formats import write_embedding_files
    from engine.sd.generation import load_used

    concept = _library().get(args.name)
    used = load_used(concept, args.run, args.step, option="run-step")
    out = Path(args.out).expanduser()
    if out.exists() and not args.force:
        raise UserError(f"{out} already exists; choose another --out or add --force to overwrite")
    if out.is_dir():
        raise UserError(f"{out} is a folder; give a file name for --out")
    if args.format == "a1111-png":
        from engine.sd.png_card import write_word_card

        if used.layers:  # A1111 has no per-layer words (checked before anything is written)
            raise UserError(f"a1111-png cards hold one vector set, not {concept.name}'s {len(used.layers)} "
                            "per-layer sets; export it with --format kohya-xti")
        written = str(write_word_card(out, concept, used))
    else:
        written = ", ".join(map(str, write_embedding_files(out, used.blocks, concept.token, args.format,
                                                           step=used.step, layers=used.layers)))
    print(f"wrote {written} ({args.format}, token {concept.token}, run {used.run}"
          f"{'' if used.final else f', step {used.step}'})")
    return 0
