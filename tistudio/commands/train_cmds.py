"""train and resume: a run (or a sweep of runs) submitted to the engine and followed here.

Everything a run would refuse is checked before it is submitted, by the same code the
engine runs (engine.settings.train), so a mistake exits 2 with one line and leaves
nothing in the library.
"""

from __future__ import annotations

from engine.settings.train import CROSS_WEIGHT, INIT_MODES, parse_method, sweep_members
from tistudio.commands.args import (
    float_arg,
    int_list,
    non_negative_int,
    positive_int,
    regularizer_list,
    stop_rules,
    word_list,
)
from tistudio.commands.run_cmds import add_tensorboard_option


def add_commands(sub) -> None:
    p = sub.add_parser("train", help="train a concept's word (a job in the engine; survives a closed terminal)")
    p.add_argument("name", help="the concept to train")
    what = p.add_argument_group("what is learned")
    what.add_argument("--init", help="initializer for this run: a word, or a phrase of --vectors tokens "
                      "(default: the concept's)")
    what.add_argument("--vectors", type=positive_int, default=1,
                      help="token slots the word expands to (the paper: 1)")
    what.add_argument("--init-from", metavar="FILE|NAME@RUN:STEP",
                      help="start from an existing embedding (a file from any tool, or a saved step)")
    what.add_argument("--regularize", type=regularizer_list, default=["none"], metavar="METHOD[:W][,…]",
                      help="keep the word editable: none (the paper), init-l2 (pull toward the initializer), "
                           "norm (penalise a norm above the vocabulary's), "
                           "directional (fixed norm, learn the direction); init-l2:0.003 gives that one its "
                           "own strength; cross and per-layer as below, joined with +: cross+per-layer; "
                           "several: a sweep, one run each")
    what.add_argument("--reg-weight", type=float_arg, default=0.0,
                      help="strength of init-l2 / norm where METHOD:W gives none (0: the method's default)")
    what.add_argument("--init-mode", choices=INIT_MODES, default="token",
                      help="where the word starts: token (the initializer's row, the paper) or cross (the text "
                           "encoder's output for it, with a small pull back to it: Pang et al. 2024)")
    what.add_argument("--cross-weight", type=float_arg, default=CROSS_WEIGHT,
                      help=f"--init-mode cross: strength of the (not squared) L2 pull to the start "
                           f"(default {CROSS_WEIGHT:g}, the paper's; 0: none)")
    what.add_argument("--per-layer", action="store_true",
                      help="P+ / XTI: one vector set per UNet cross-attention layer (SD 1.x/2.x: 16), each "
                           "layer conditioned on its own; exported with --format kohya-xti")
    what.add_argument("--templates", metavar="FILE",
                      help="prompt templates, one per line with {} where the token goes and {caption} where "
                           "the image's caption does (A1111's [name] and [filewords] read as those); default: "
                           "the study's object or style templates, followed by the caption where images have one")
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--steps", type=positive_int, default=2000, help="optimizer steps (the study: 1500-2400)")
    opt.add_argument("--lr", type=float_arg, default=5e-4, help="learning rate (the study's)")
    opt.add_argument("--seed", type=int, default=0, help="random seed of the run")
    opt.add_argument("--batch-size", type=positive_int, default=1, help="images per micro-batch")
    opt.add_argument("--grad-accum", type=positive_int, default=1,
                     help="micro-batches per optimizer step (effective batch = batch size x this)")
    opt.add_argument("--weight-decay", type=float_arg, default=1e-2, help="AdamW weight decay on the word's vectors")
    opt.add_argument("--lr-schedule", choices=("constant", "warmup", "cosine"), default="constant",
                     help="learning-rate schedule")
    opt.add_argument("--warmup-steps", type=non_negative_int, default=0, help="linear warm-up steps")
    data = p.add_argument_group("data")
    data.add_argument("--resolution", type=positive_int, help="training resolution in pixels (default: the model's)")
    data.add_argument("--center-crop", action="store_true", help="crop images to a centred square before resizing")
    data.add_argument("--flip", type=float_arg, default=0.5, help="probability of a horizontal flip")
    data.add_argument("--buckets", action="store_true",
                      help="train each image at the size nearest its aspect ratio (at the model's pixel area, "
                           "in steps of 64 px on SD), not squashed or cropped square; one run at a time")
    data.add_argument("--masked-loss", action="store_true",
                      help="weight the loss by each image's mask (see `concept add --masks`); an image "
                           "without one counts whole")
    data.add_argument("--ema", type=float_arg, metavar="DECAY",
                      help="save a moving average of the word with this decay (0-1, e.g. 0.99) instead of its "
                           "last value")
    sweep = p.add_argument_group("sweeps (runs trained together, one UNet call per step)")
    sweep.add_argument("--seeds", type=int_list, help="one run per seed, e.g. 1,2,3,4")
    sweep.add_argument("--inits", type=word_list, help="one run per initializer word, e.g. fish,dragon")
    out = p.add_argument_group("saving and previews")
    out.add_argument("--save-every", type=positive_int, default=500, help="save embedding + checkpoint every N steps")
    out.add_argument("--keep-checkpoints", type=positive_int,
                     help="keep only the newest N resumable checkpoints (default: all; the latest is always kept)")
    out.add_argument("--preview-every", type=non_negative_int, default=500, help="preview image every N steps (0: off)")
    out.add_argument("--preview-prompt", help="prompt for previews; {token} or the token stands for the concept")
    out.add_argument("--preview-steps", type=positive_int, default=25, help="sampling steps of a preview")
    out.add_argument("--log-every", type=positive_int, default=10, help="a loss line every N steps")
    add_tensorboard_option(out)
    watch = p.add_argument_group("knowing when it is learned (probes, the deterministic loss, stopping)")
    watch.add_argument("--probe-every", type=non_negative_int, default=500,
                       help="measure reconstruction and editability every N steps on a small fixed probe set "
                            "(the SD row once, at the start; 0: off)")
    watch.add_argument("--probe-images", type=positive_int, default=4, help="probe images of the neutral prompt")
    watch.add_argument("--probe-edit-images", type=positive_int, default=1, help="probe images per edit prompt")
    watch.add_argument("--probe-steps", type=positive_int, default=10,
                       help="sampling steps of a probe image (Table 1 samples 25; 10 keeps probes near 6%% of a run)")
    watch.add_argument("--dloss-every", type=non_negative_int, default=25,
                       help="the training loss on one fixed batch (images, prompts, noise, timesteps) every N "
                            "steps: a smooth curve that tracks quality (0: off)")
    watch.add_argument("--stop-when", type=stop_rules, metavar="RULE[,RULE]",
                       help="end the run early: plateau[:STEPS] (the deterministic loss has flattened: DVAR's rule, "
                            "window 300 steps), recon:X (a probe's reconstruction reaches X), diverged (the word's "
                            "norm or its deterministic loss runs away)")
    watch.add_argument("--best-by", choices=("tradeoff", "recon", "edit", "balanced"), default="tradeoff",
                       help="which probed step is the run's best (NAME@RUN:best): tradeoff (the highest "
                            "reconstruction keeping editability within 40%% of SD's), recon, edit, or balanced "
                            "(reconstruction + editability)")
    hw = p.add_argument_group("hardware")
    hw.add_argument("--low-vram", action="store_true",
                    help="gradient checkpointing through the UNet: fits 8 GB cards, about 2x slower")
    hw.add_argument("--compile", choices=("off", "default", "reduce-overhead"), default="off",
                    help="torch.compile the UNet (reduce-overhead: CUDA graphs; a slow first warm-up)")
    hw.add_argument("--precision", choices=("auto", "fp32", "fp16", "bf16"), default="auto",
                    help="frozen weights' dtype (auto: fp16 on CUDA, fp32 on CPU)")
    hw.add_argument("--deterministic", action="store_true",
                    help="torch's deterministic algorithms: a resumed run ends bit for bit where an "
                         "uninterrupted one does on CUDA too (on a CPU it always does); slower")
    hw.add_argument("--device", help="cpu, cuda or cuda:N (default: $TISTUDIO_DEVICE, else CUDA when present)")
    p.add_argument("--detach", action="store_true", help="print the run id and return at once")
    p.set_defaults(func=train)

    p = sub.add_parser("resume", help="continue a cancelled, failed or interrupted run from its last checkpoint")
    p.add_argument("run", help="the run id (`tistudio runs` lists them)")
    p.add_argument("--detach", action="store_true", help="print the run id and return at once")
    add_tensorboard_option(p)
    p.set_defaults(func=resume)


# --- building and checking the job ---------------------------------------------------------------


def train_params(args) -> dict:
    """The job params for `args`, as the engine reads them (TrainConfig fields + where to run)."""
    from engine.settings.model import model_params

    params = {
        "steps": args.steps, "lr": args.lr, "seed": args.seed, "batch_size": args.batch_size,
        "grad_accum": args.grad_accum, "weight_decay": args.weight_decay, "lr_schedule": args.lr_schedule,
        "warmup_steps": args.warmup_steps, "vectors": args.vectors, "regularize": args.regularize[0],
        "reg_weight": args.reg_weight, "save_every": args.save_every,
        "keep_checkpoints": args.keep_checkpoints, "preview_every": args.preview_every,
        "preview_steps": args.preview_steps, "log_every": args.log_every, "resolution": args.resolution,
        "center_crop": args.center_crop, "flip_p": args.flip, "low_vram": args.low_vram, "compile": args.compile,
        "buckets": args.buckets, "masked_loss": args.masked_loss, "ema": args.ema,
        "deterministic": args.deterministic, "precision": args.precision, "device": args.device,
        "probe_every": args.probe_every, "probe_images": args.probe_images,
        "probe_edit_images": args.probe_edit_images, "probe_steps": args.probe_steps,
        "dloss_every": args.dloss_every, "best_by": args.best_by, **model_params(),
    }
    params.update(init_mode=args.init_mode, cross_weight=args.cross_weight, per_layer=args.per_layer)
    if len(args.regularize) == 1:  # one method: its parts (cross, per-layer) are this run's settings
        params.update(parse_method(args.regularize[0]))
    methods = args.regularize if len(args.regularize) > 1 else None
    optional = {"init": args.init, "seeds": args.seeds, "inits": args.inits, "regularizes": methods,
                "preview_prompt": args.preview_prompt, "stop_when": args.stop_when,
                "init_from": _init_from(args.init_from), "templates": _templates(args.templates)}
    params.update({k: v for k, v in optional.items() if v})
    return params


def _init_from(value: str | None) -> str | None:
    import os

    from engine.errors import UserError

    if not value:
        return None
    if "@" in value and not os.path.exists(value):
        return value  # NAME@RUN:STEP; the engine resolves it against the library
    path = os.path.abspath(os.path.expanduser(value))
    if not os.path.isfile(path) and not os.path.isdir(path):
        raise UserError(f"--init-from {value}: no such file; give an embedding file or NAME@RUN:STEP")
    return path


def _templates(path: str | None) -> list[str] | None:
    """The --templates file's lines (ours, or A1111's [name]/[filewords]: engine.settings.prompts)."""
    from engine.errors import UserError
    from engine.settings.prompts import load_templates

    if not path:
        return None
    try:
        return load_templates(path)
    except UserError as exc:
        raise UserError(f"--templates: {exc}") from None


def check_before_submit(name: str, kind: str, params: dict) -> None:
    """Fail now, not in the queue: the engine's own door (engine.settings.jobs: the concept, every
    member's settings, the device), then what needs the model here: the model, the words."""
    from engine.sd.models import load_tokenizer, model_info
    from engine.settings.jobs import check_job
    from engine.settings.train import config_from_params
    from engine.store.library import Library, initializer_ids
    from tistudio.commands.output import home

    concept = Library(home()).get(name)
    check_job(kind, params, concept)
    configs = [config_from_params(member, concept) for member in sweep_members(params)]
    info = model_info()  # a bad --model fails here, with its own message
    tokenizer = load_tokenizer()
    for config in configs:
        if config.buckets:  # the model's sizes: kohya's 64-px steps on SD, the model's unit on small ones
            from engine.inversion.buckets import bucket_sizes, info_step

            bucket_sizes(config.resolution or info.resolution, info_step(info))
        layers = info.require_layers() if config.per_layer else ()  # SDXL, an unmappable UNet: one line
        if config.init_from:
            from engine.inversion.init_from import starting_blocks

            # the file (or saved step) must fit this model and --vectors: read it now, not in the queue
            starting_blocks(config.init_from, info, config.vectors, home(), layers)
        else:
            initializer_ids(tokenizer, config.init, config.vectors)


def train(args) -> int:
    from engine.wire.client import call

    params = train_params(args)
    members = sweep_members(params)
    kind = "sweep" if len(members) > 1 else "train"
    if kind == "train":  # a "sweep" of one is a plain run
        params = {k: v for k, v in members[0].items() if v is not None or k == "init"}
        if params.get("init") is None:
            params.pop("init")
    check_tensorboard(args)
    check_before_submit(args.name, kind, params)
    run_id = call("submit", kind, concept=args.name, params=params)
    if not args.detach:
        print(_header(args, len(members)))
    return after_submit(run_id, args.detach, args.tensorboard)


def _header(args, runs: int) -> str:
    batch = args.batch_size * args.grad_accum
    batch_text = f"batch {batch}" if args.grad_accum == 1 else f"batch {args.batch_size} x {args.grad_accum} = {batch}"
    what = f"{runs} runs trained together, " if runs > 1 else ""
    extras = [x for x in ("low-vram" if args.low_vram else "",
                          f"compile {args.compile}" if args.compile != "off" else "",
                          "deterministic" if args.deterministic else "",
                          f"{args.vectors} vectors" if args.vectors > 1 else "",
                          "buckets" if args.buckets else "", "masked loss" if args.masked_loss else "",
                          f"ema {args.ema:g}" if args.ema else "") if x]
    return (f"training {args.name}: {what}{args.steps} steps, lr {args.lr:g}, {batch_text}"
            + (f", {', '.join(extras)}" if extras else ""))


def resume(args) -> int:
    from engine.wire.client import call

    check_tensorboard(args)
    run_id = call("submit", resume=args.run)
    return after_submit(run_id, args.detach, args.tensorboard)


def check_tensorboard(args) -> None:
    """--tensorboard is written by this command as it follows the run: refuse it with --detach
    (saying what does it then), and without the tensorboard package, before anything is submitted."""
    from engine.errors import UserError

    if not args.tensorboard:
        return
    if args.detach:
        raise UserError("--tensorboard writes the logs while this command follows the run, which --detach does "
                        "not; follow it with `tistudio attach RUN --tensorboard DIR`, or write them later with "
                        "`tistudio runs export RUN --tensorboard DIR`")
    from engine.store.tensorboard import require_tensorboard

    require_tensorboard(args.tensorboard)


def after_submit(run_id: str, detach: bool, tensorboard: str | None = None) -> int:
    import asyncio

    from tistudio.commands.run_cmds import _follow

    if detach:
        print(run_id)
        return 0
    print(f"run {run_id} (Ctrl-C cancels it, resumable; it keeps running if the terminal closes)")
    return asyncio.run(_follow(run_id, cancel_on_interrupt=True, report=True, tensorboard=tensorboard))

