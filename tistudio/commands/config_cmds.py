"""config path|show, and completion: setting tistudio up in a shell."""

from __future__ import annotations

SHELLS = ("bash", "zsh", "fish")


def add_commands(sub) -> None:
    config = sub.add_parser("config", help="the config file: default model, home, theme, option defaults")
    actions = config.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = actions.add_parser("path", help="print where the config file is (it may not exist yet)")
    p.set_defaults(func=config_path)
    p = actions.add_parser("show", help="print the settings in effect and where each came from")
    p.add_argument("--json", action="store_true", help="print them as JSON")
    p.set_defaults(func=config_show)

    p = sub.add_parser("completion", help="print a shell completion script, e.g. "
                                          "`tistudio completion bash >> ~/.bashrc`")
    p.add_argument("shell", choices=SHELLS, help="the shell to complete in")
    p.set_defaults(func=completion)


def config_path(args) -> int:
    from tistudio.config import config_path as path

    print(path())
    return 0


def config_show(args) -> int:
    import os

    from engine.sd.models import DEFAULT_SPEC
    from engine.settings.model import ModelOptions
    from engine.store.paths import home_dir
    from tistudio.commands.output import print_json
    from tistudio.config import load_config

    config = load_config()
    settings = {
        "config_file": str(config.path),
        "home": str(home_dir()),
        "model": os.environ.get("TISTUDIO_MODEL") or DEFAULT_SPEC,
        **ModelOptions.from_env().params(),  # what qualifies the model, when set
        "theme": config.theme,
        "image_protocol": config.effective_protocol(),
        "devices": os.environ.get("TISTUDIO_DEVICES") or "auto",
        "ray_address": os.environ.get("TISTUDIO_RAY_ADDRESS") or "off (jobs run on this machine's devices)",
        **{f"[{name}]": table for name, table in config.commands.items()},
    }
    if args.json:
        print_json(settings)
    else:
        for key, value in settings.items():
            print(f"{key:16} {value}")
    return 0


def completion(args) -> int:
    import argcomplete

    # The script calls back into tistudio, which answers through argcomplete (see cli.main).
    print(argcomplete.shellcode(["tistudio"], shell=args.shell))
    return 0
