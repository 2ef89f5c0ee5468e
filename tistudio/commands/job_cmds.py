"""generate, eval, experiment: engine jobs whose result the command prints."""

from __future__ import annotations

import asyncio
import os

from engine.settings.samplers import SAMPLERS
from tistudio.commands.args import float_arg, int_list, positive_int, regularizer_list, saved_step, word_list
from tistudio.commands.output import print_json, print_table


def add_commands(sub) -> None:
    p = sub.add_parser("generate", help="images from a prompt; library tokens load their embeddings")
    p.add_argument("prompt")
    p.add_argument("--use", action="append", default=[], metavar="NAME@RUN:STEP",
                   help="which embedding a concept uses (default: its latest finished run's final one)")
    p.add_argument("-n", type=positive_int, default=4, help="images to make")
    p.add_argument("--seed", type=int, default=0, help="first seed; images use seed, seed+1, …")
    p.add_argument("--steps", type=positive_int, default=25, help="sampling steps")
    p.add_argument("--sampler", default="dpm++2m", choices=tuple(SAMPLERS),
                   help="the sampler (its A1111 name goes into the PNG: DPM++ 2M, Euler a, DDIM …)")
    p.add_argument("--width", type=positive_int, help="image width in pixels, a multiple of 8 (default: the model's)")
    p.add_argument("--height", type=positive_int, help="image height in pixels, a multiple of 8 (default: the model's)")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="images sampled at once (memory vs speed; default: 4 at 512 px, up to 16 on smaller images)")
    p.add_argument("--guidance", type=float_arg, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--negative", default="", help="negative prompt")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--compare", action="store_true", help="SD and SD+TI with the same seeds, side by side")
    mode.add_argument("--sd", action="store_true", help="plain SD: tokens replaced by the concepts' descriptions")
    p.add_argument("--out", help="output folder (default: <home>/outputs/<time>-<prompt>/)")
    p.add_argument("--json", action="store_true", help="print a list of {path, prompt, seed, mode}")
    p.set_defaults(func=generate)

    p = sub.add_parser("eval", help="the paper's Table 1: SD vs SD+TI reconstruction and editability")
    p.add_argument("name")
    p.add_argument("--run", help="run id (default: the latest finished run)")
    p.add_argument("--step", type=saved_step,
                   help="a saved step, or best (the run's best probed step); default: the final embedding")
    p.add_argument("--images", type=positive_int, default=16, help="images per set (the paper's 16)")
    p.add_argument("--prompts", help="a file of edit prompts, one per line, {} where the token goes "
                                     "(default: the study's three; on builtin:demo, three in its world's words)")
    _clip_args(p)
    _sampling_args(p)
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.set_defaults(func=evaluate)

    exp = sub.add_parser("experiment", help="the study: steps, initializer word, seed, regulariser, synthesis batches"
                         ).add_subparsers(
        dest="experiment", metavar="KIND", required=True)
    p = exp.add_parser("steps", help="reconstruction/editability over a run's saved steps, with a grid")
    p.add_argument("name")
    p.add_argument("--run", help="run id (default: the latest finished run)")
    p.add_argument("--at", type=int_list, help="steps to compare (default: every saved step)")
    _experiment_args(p)
    p = exp.add_parser("init", help="one run per initializer word (trained together), grid and table")
    p.add_argument("name")
    p.add_argument("--words", type=word_list, required=True, help="e.g. fish,dragon")
    p.add_argument("--steps", type=positive_int, default=2000, help="training steps of each run")
    _deterministic_arg(p)
    p.add_argument("--seed", type=int, default=0, help="random seed of every run")
    _experiment_args(p)
    p = exp.add_parser("seeds", help="one run per seed (trained together), grid and table")
    p.add_argument("name")
    p.add_argument("--seeds", type=int_list, required=True, help="e.g. 1,2")
    p.add_argument("--steps", type=positive_int, default=2000, help="training steps of each run")
    _deterministic_arg(p)
    _experiment_args(p)
    p = exp.add_parser("regularize", help="the trade-off: one run per method (and seed), trained together; "
                                          "Table 1 for each, with the SD row, the frontier and a grid")
    p.add_argument("name")
    p.add_argument("--methods", type=regularizer_list, metavar="METHOD[:W][+…][,…]",
                   help="methods to compare: none (the paper's inversion), init-l2, norm, directional, cross "
                        "(cross-initialisation), per-layer (P+), joined with + (cross+per-layer); init-l2:0.003 "
                        f"gives one its own strength (default: {','.join(DEFAULT_METHODS)}, and per-layer where "
                        "the model maps its layers)")
    p.add_argument("--seeds", type=int_list, metavar="S[,S…]",
                   help="train every method at each of these seeds (the same seeds for all); the table gives "
                        "each method's mean and standard error")
    p.add_argument("--reg-weight", type=float_arg, default=0.0,
                   help="strength of init-l2 and norm where METHOD:W gives none (0: each method's default)")
    p.add_argument("--steps", type=positive_int, default=2000, help="training steps of each run")
    _deterministic_arg(p)
    p.add_argument("--seed", type=int, default=0, help="random seed of every run")
    _experiment_args(p)
    p = exp.add_parser("synthesis", help="the study's section 5: the word in new scenes (objects) or on new "
                                         "subjects (styles), SD and SD+TI side by side, every image with its metadata")
    p.add_argument("name")
    p.add_argument("--run", help="run id (default: the latest finished run)")
    p.add_argument("--step", type=saved_step,
                   help="a saved step, or best (the run's best probed step); default: the final embedding")
    p.add_argument("--images", type=positive_int, default=2, help="images per prompt for SD and for SD+TI")
    _sampling_args(p)
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.set_defaults(func=experiment)


def _deterministic_arg(p) -> None:
    p.add_argument("--deterministic", action="store_true",
                   help="train with torch's deterministic algorithms (the same bits on every CUDA run; slower)")


def _sampling_args(p) -> None:
    """How a measurement samples its images (the study's: 25 DPM++ steps)."""
    p.add_argument("--sample-steps", type=positive_int, default=25, metavar="N",
                   help="sampling steps of every measured image")
    p.add_argument("--sample-batch", type=positive_int, default=None, metavar="N",
                   help="images sampled at once while measuring (memory vs speed; default: 4 at 512 px, "
                        "up to 16 on smaller images)")


def _clip_args(p) -> None:
    p.add_argument("--clip", help="open_clip model (e.g. ViT-B-32:openai, ViT-L-14) or builtin:tiny/builtin:demo "
                   "(default: the model's own for built-ins, else ViT-B-32:openai)")
    p.add_argument("--clip-weights", help="a local open_clip checkpoint for --clip (offline use)")
    p.add_argument("--dino", metavar="MODEL",
                   help="add a DINO reconstruction column (DreamBooth's metric), e.g. facebook/dino-vits16 from "
                        "the Hugging Face cache (`hf download facebook/dino-vits16` first)")


def _experiment_args(p) -> None:
    p.add_argument("--images", type=positive_int, default=4, help="images per prompt and column")
    _clip_args(p)
    _sampling_args(p)
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.set_defaults(func=experiment)


def _model_param() -> dict:
    from engine.settings.model import model_params

    return model_params()  # the spec and its qualifiers (--prediction-type, --model-resolution)


def _sampling_params(args) -> dict:
    return {"sample_steps": args.sample_steps, "sample_batch_size": args.sample_batch}


def _clip_params(args) -> dict:
    dino = getattr(args, "dino", None)
    if dino:  # not in the cache: one line now, nothing submitted
        from engine.inversion.dino import prepare_dino

        prepare_dino(dino)
    return {"clip": args.clip, "clip_weights": args.clip_weights and os.path.abspath(args.clip_weights),
            **({"dino": dino} if dino else {})}


def generate(args) -> int:
    mode = "compare" if args.compare else "sd" if args.sd else "ti"
    params = {"prompt": args.prompt, "negative": args.negative, "n": args.n, "seed": args.seed, "steps": args.steps,
              "guidance": args.guidance, "mode": mode, "uses": args.use, "sampler": args.sampler,
              "width": args.width, "height": args.height, "batch_size": args.batch_size,
              "out_dir": args.out and os.path.abspath(args.out), **_model_param()}
    result = run_job("generate", None, params, quiet=args.json)
    if args.json:
        print_json(result["images"])
    else:
        for image in result["images"]:
            print(f"{image['mode']:3} seed {image['seed']:<6} {image['path']}")
    return 0


def _check_eval(name: str, run: str | None, step: int | None, prompts: str | None, option: str = "run-step") -> None:
    """What an evaluation would refuse, refused now: no images, nothing trained, no prompts file, a bad model."""
    from engine.errors import UserError
    from engine.sd.models import model_info
    from engine.store.library import Library
    from engine.store.words import choose_embedding
    from tistudio.commands.output import home

    concept = Library(home()).get(name)
    if not concept.images:
        raise UserError(f"concept {concept.name!r} has no training images to measure reconstruction against; add "
                        f"some with `tistudio concept images add {concept.name} FILE...`")
    choose_embedding(concept, run, step, option=option)
    if prompts and not os.path.isfile(prompts):
        raise UserError(f"--prompts {prompts}: no such file; give a file of edit prompts, one per line")
    model_info()


def evaluate(args) -> int:
    _check_eval(args.name, args.run, args.step, args.prompts)
    params = {"run": args.run, "step": args.step, "images": args.images, **_sampling_params(args),
              "prompts_file": args.prompts and os.path.abspath(args.prompts), **_clip_params(args), **_model_param()}
    result = run_job("eval", args.name, params, quiet=args.json)
    table = result["table"]
    if args.json:
        print_json(table)
        return 0
    rows = {r["model"]: r for r in table["rows"]}
    dino = [f"{r['dino']:.4f}" for r in table["rows"]] if table.get("dino") else None
    print_table(f"Table 1 — {args.name} ({table.get('images_per_set', args.images)} images per set)",
                ["model", "reconstruction", "editability", "editability (per image)"] + (["DINO"] if dino else []),
                [[r["model"], f"{r['reconstruction']:.4f}", f"{r['editability']:.4f}",
                  f"{r.get('editability_per_image', float('nan')):.4f}"] + ([dino[i]] if dino else [])
                 for i, r in enumerate(table["rows"])]
                + [["paper: SD / SD+TI", "0.5622 / 0.8077", "0.2639 / 0.1611", ""] + ([""] if dino else [])])
    if "SD" in rows and "SD+TI" in rows:
        gain = rows["SD+TI"]["reconstruction"] - rows["SD"]["reconstruction"]
        cost = rows["SD+TI"]["editability"] - rows["SD"]["editability"]
        print(f"the word bought {gain:+.4f} reconstruction and cost {-cost:+.4f} editability")
    print(f"report: {result['report_dir']}")
    return 0


def _check_experiment(args) -> None:
    from engine.errors import UserError
    from engine.store.library import Library
    from tistudio.commands.output import home

    if args.experiment == "steps":
        _check_eval(args.name, args.run, None, None, option="run")
        return
    if args.experiment == "synthesis":
        from engine.store.library import Library
        from engine.store.words import choose_embedding
        from tistudio.commands.output import home

        choose_embedding(Library(home()).get(args.name), args.run, args.step, option="run-step")
        return
    concept = Library(home()).get(args.name)
    if not concept.images:
        raise UserError(f"concept {concept.name!r} has no training images; add some with "
                        f"`tistudio concept images add {concept.name} FILE...`")
    if args.experiment == "regularize" and any("per-layer" in m for m in args.methods or []):
        from engine.sd.models import model_info

        model_info().require_layers("per-layer")  # SDXL, an unmappable UNet: one line, nothing submitted


DEFAULT_METHODS = ("none", "init-l2", "norm", "directional", "cross")


def default_methods() -> list[str]:
    """Every method on the frontier: the regularisers, cross, and per-layer where the model maps its layers."""
    from engine.sd.models import model_info

    return list(DEFAULT_METHODS) + (["per-layer"] if model_info().layers else [])


def experiment(args) -> int:
    _check_experiment(args)
    params = {"kind": args.experiment, "images": args.images, **_sampling_params(args), **_model_param()}
    if args.experiment != "synthesis":
        params.update(_clip_params(args))
    if args.experiment == "steps":
        params.update(run=args.run, at=args.at)
    elif args.experiment == "synthesis":
        params.update(run=args.run, step=args.step)
    elif args.experiment == "init":
        params.update(values=args.words, steps=args.steps, seed=args.seed, preview_every=0,
                      save_every=args.steps)
    elif args.experiment == "regularize":
        params.update(values=args.methods or default_methods(), reg_weight=args.reg_weight, steps=args.steps,
                      seed=args.seed, preview_every=0, save_every=args.steps)
        if args.seeds:
            params["seeds"] = args.seeds
    else:
        params.update(values=args.seeds, steps=args.steps, preview_every=0, save_every=args.steps)
    if getattr(args, "deterministic", False):  # the experiments that train
        params["deterministic"] = True
    result = run_job("experiment", args.name, params, quiet=args.json)
    if args.json:
        print_json(result)
        return 0
    for key in ("curve_txt", "table_md", "synthesis_md"):
        if result.get(key) and os.path.isfile(result[key]):
            print(open(result[key], encoding="utf-8").read())
    for key in ("grid", "table_md", "curve_json", "synthesis_json", "dir"):
        if result.get(key):
            print(f"{key:10} {result[key]}")
    return 0


def run_job(kind: str, concept: str | None, params: dict, quiet: bool = False) -> dict:
    """Submit, follow with a progress bar (Ctrl-C cancels), and return the job's result."""
    from engine.errors import UserError
    from engine.settings.jobs import check_job
    from engine.store.library import Library
    from engine.wire.client import call
    from tistudio.commands.output import home
    from tistudio.commands.run_cmds import _follow

    check_job(kind, params, Library(home()).get(concept) if concept else None)  # the engine's door, here first
    run_id = call("submit", kind, concept=concept, params=params)
    code = asyncio.run(_follow(run_id, cancel_on_interrupt=True, quiet=quiet))
    record = next((j for j in call("jobs") if j["id"] == run_id), {})
    if code != 0 or record.get("status") != "done":
        raise UserError(f"{kind} {record.get('status', 'failed')}: {record.get('error') or 'see the engine log'}")
    return record.get("result") or {}
