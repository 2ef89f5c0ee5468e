"""concept add|list|show|rm|rename, import, export: the library, in-process (no engine needed)."""

from __future__ import annotations

from pathlib import Path

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
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=concept_add)

    p = concept.add_parser("list", help="list concepts")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=concept_list)

    p = concept.add_parser("show", help="one concept, its images and runs")
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=concept_show)

    p = concept.add_parser("rm", help="delete a concept, its images and runs")
    p.add_argument("name")
    p.add_argument("--yes", action="store_true", help="really delete (required)")
    p.set_defaults(func=concept_rm)

    p = concept.add_parser("rename", help="rename a concept (its runs come along)")
    p.add_argument("old")
    p.add_argument("new")
    p.set_defaults(func=concept_rename)

    p = sub.add_parser("import", help="import an embedding file as a concept (diffusers, A1111, kohya, OneTrainer)")
    p.add_argument("file")
    p.add_argument("--name", help="concept name (default: from the file)")
    p.add_argument("--token", help="the word in prompts (default: from the file, or <NAME>)")
    p.add_argument("--description", help="words the SD baseline uses instead of the token (default: the name)")
    p.add_argument("--style", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=import_embedding)

    p = sub.add_parser("export", help="write a concept's embedding for other tools")
    p.add_argument("name")
    p.add_argument("--run", help="run id (default: the latest finished run)")
    p.add_argument("--step", type=int, help="a saved step (default: the final embedding)")
    p.add_argument("--format", default="diffusers", choices=("diffusers", "a1111", "kohya"))
    p.add_argument("--out", required=True, help="output file")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    p.set_defaults(func=export_embedding)


def _library():
    from engine.library import Library

    return Library(home())


def _tokenizer():
    from engine.models import load_tokenizer

    return load_tokenizer()


def concept_add(args) -> int:
    concept = _library().add(
        args.name, Path(args.images), args.init, token=args.token,
        property="style" if args.style else "object", description=args.description, tokenizer=_tokenizer(),
    )
    if args.json:
        print_json(concept.to_dict())
    else:
        print(f"added {concept.name}: token {concept.token}, init {concept.init!r}, {len(concept.images)} images")
    return 0


def _concept_row(concept) -> dict:
    from engine.embeddings import concept_runs

    data = concept.to_dict()
    data["runs"] = len(concept_runs(concept.path))
    return data


def concept_list(args) -> int:
    rows = [_concept_row(c) for c in _library().list()]
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
    from engine.embeddings import concept_runs

    concept = _library().get(args.name)
    data = concept.to_dict()
    data["image_files"] = [str(p) for p in concept.images]
    data["runs"] = [{k: r.get(k) for k in ("id", "kind", "status", "step", "steps", "embedding")}
                    for r in concept_runs(concept.path)]
    if args.json:
        print_json(data)
        return 0
    for key in ("name", "token", "init", "property", "description", "created", "path"):
        print(f"{key:12} {data[key]}")
    print(f"{'images':12} {len(data['image_files'])}")
    if data["runs"]:
        rows = [[r["id"], r["kind"], r["status"], f"{r['step']}/{r['steps']}", r["embedding"]] for r in data["runs"]]
        print_table("runs", ["id", "kind", "status", "step", "embedding"], rows)
    return 0


def concept_rm(args) -> int:
    from engine.errors import UserError

    library = _library()
    concept = library.get(args.name)
    if not args.yes:
        raise UserError(f"deleting {concept.name!r} removes its images and runs; add --yes to confirm")
    library.delete(concept.name)
    print(f"deleted {concept.name}")
    return 0


def concept_rename(args) -> int:
    concept = _library().rename(args.old, args.new)
    print(f"renamed {args.old} to {concept.name} (token {concept.token})")
    return 0


def import_embedding(args) -> int:
    from engine.importing import import_embedding_file

    concept, run_id = import_embedding_file(
        _library(), Path(args.file), name=args.name, token=args.token, description=args.description,
        property="style" if args.style else "object",
    )
    if args.json:
        print_json({**concept.to_dict(), "run": run_id})
    else:
        print(f"imported {args.file} as concept {concept.name} (token {concept.token}, run {run_id})")
    return 0


def export_embedding(args) -> int:
    from engine.errors import UserError
    from engine.formats import write_embedding
    from engine.generate import load_used

    concept = _library().get(args.name)
    used = load_used(concept, args.run, args.step)
    out = Path(args.out).expanduser()
    if out.exists() and not args.force:
        raise UserError(f"{out} already exists; choose another --out or add --force to overwrite")
    if out.is_dir():
        raise UserError(f"{out} is a folder; give a file name for --out")
    written = write_embedding(out, used.vectors, concept.token, args.format, step=used.step)
    print(f"wrote {written} ({args.format}, token {concept.token}, run {used.run}"
          f"{'' if used.final else f', step {used.step}'})")
    return 0
