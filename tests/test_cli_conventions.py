"""The command line behaves as a user of any well-kept CLI expects.

Every option a message names exists; every option says its default; global options go
before or after the command; `python -m tistudio`, `--version`, completion scripts,
config-file defaults; every environment variable the code reads is in the README.
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tistudio.cli import build_parser, main

REPO = Path(__file__).resolve().parent.parent
OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
# Options of other programs that our messages quote: the engine's own `python -m engine.server.main`.
OTHER_PROGRAMS = {"engine/server/main.py": {"--idle", "--cancel-grace", "--home"},
                  "engine/devices/probe.py": {"--query-gpu", "--format"},  # nvidia-smi's
                  "engine/server/ray_workers.py": {"--head", "--num-gpus"},  # `ray start`'s, in its advice
                  "engine/server/zygote.py": {"--home", "--fd", "--listen"},  # `python -m engine.server.zygote`
                  "engine/store/tensorboard.py": {"--logdir"},  # `tensorboard --logdir DIR`, in its advice
                  "tistudio/commands/run_cmds.py": {"--logdir"},
                  "tistudio/screens/train.py": {"--logdir"}}


def _parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                yield from _parsers(child)


def _cli_options() -> set[str]:
    return {s for p in _parsers(build_parser()) for a in p._actions for s in a.option_strings}


def _quoted_options(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            found += [(node.lineno, m) for m in OPTION.findall(node.value)]
    return found


def test_every_option_a_message_names_exists():
    known = _cli_options()
    missing = []
    for path in sorted([*REPO.glob("engine/**/*.py"), *REPO.glob("tistudio/**/*.py")]):
        rel = path.relative_to(REPO).as_posix()
        allowed = known | OTHER_PROGRAMS.get(rel, set())
        missing += [f"{rel}:{line} {opt}" for line, opt in _quoted_options(path) if opt not in allowed]
    assert not missing, "messages name options no command has:\n" + "\n".join(missing)


def test_the_scan_sees_a_made_up_option(tmp_path):
    bogus = tmp_path / "bogus.py"
    bogus.write_text('raise SystemExit("try --no-such-option or --low-vram")\n')
    assert [opt for _, opt in _quoted_options(bogus)] == ["--no-such-option", "--low-vram"]
    assert "--no-such-option" not in _cli_options() and "--low-vram" in _cli_options()


def test_every_option_has_help_and_shows_its_default():
    for parser in _parsers(build_parser()):
        for action in parser._actions:
            if not action.option_strings or isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{parser.prog} {action.option_strings[0]} has no help text"
            shown = parser.formatter_class(parser.prog)._get_help_string(action)
            nothing = action.default is None or action.default is False or action.default == argparse.SUPPRESS
            if not nothing:
                assert "default" in shown, f"{parser.prog} {action.option_strings[0]} hides its default"


def test_train_help_lists_the_new_options(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for option in ("--low-vram", "--compile", "--resolution", "--templates", "--weight-decay", "--device",
                   "--grad-accum", "--init-from", "--keep-checkpoints", "--vectors", "--regularize"):
        assert option in text
    assert "(default: 2000)" in text and "(default: 0.0005)" in text


def test_global_options_work_after_the_command(tmp_path, capsys):
    home = tmp_path / "elsewhere"
    assert main(["concept", "list", "--home", str(home), "--json"]) == 0
    assert os.environ["TISTUDIO_HOME"] == str(home)
    assert capsys.readouterr().out.strip() == "[]"


def test_python_m_tistudio_and_version():
    proc = subprocess.run([sys.executable, "-m", "tistudio", "--version"], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("tistudio ")
    assert any(line.startswith("torch ") for line in lines)
    assert any(line.startswith("device") for line in lines)
    assert "diffusers" in proc.stdout


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_scripts(shell, capsys):
    assert main(["completion", shell]) == 0
    script = capsys.readouterr().out
    assert "tistudio" in script and len(script) > 200


def test_completion_lists_train(tmp_path):
    out = tmp_path / "answer"
    env = {**os.environ, "_ARGCOMPLETE": "1", "COMP_LINE": "tistudio tra", "COMP_POINT": "12",
           "_ARGCOMPLETE_STDOUT_FILENAME": str(out), "_ARGCOMPLETE_IFS": "\n"}
    subprocess.run([sys.executable, "-m", "tistudio"], env=env, capture_output=True, cwd=REPO, timeout=120)
    assert "train" in out.read_text().split()


def test_config_file_defaults_for_model_and_train(tmp_path, monkeypatch, capsys):
    config = Path(os.environ["TISTUDIO_CONFIG_DIR"])
    config.mkdir(parents=True)
    (config / "config.toml").write_text('model = "builtin:tiny"\n[train]\nsteps = 123\nlow-vram = true\n')
    monkeypatch.delenv("TISTUDIO_MODEL")
    args = build_parser().parse_args(["train", "toy"])
    assert args.steps == 123 and args.low_vram is True
    assert build_parser().parse_args(["train", "toy", "--steps", "7"]).steps == 7  # the command line wins
    assert main(["config", "show", "--json"]) == 0
    assert '"model": "builtin:tiny"' in capsys.readouterr().out


def test_a_bad_config_default_is_one_line_and_exit_2(tmp_path, capsys):
    config = Path(os.environ["TISTUDIO_CONFIG_DIR"])
    config.mkdir(parents=True)
    (config / "config.toml").write_text("[train]\nstepz = 5\n")
    assert main(["concept", "list"]) == 2
    err = capsys.readouterr().err
    assert "[train] has no setting 'stepz'" in err and err.count("\n") == 1
    (config / "config.toml").write_text('[train]\ncompile = "fast"\n')
    assert main(["concept", "list"]) == 2
    assert "must be one of off, default, reduce-overhead" in capsys.readouterr().err


def test_the_default_model_is_the_demo_world(monkeypatch):
    from engine.sd.models import resolve_spec

    monkeypatch.delenv("TISTUDIO_MODEL")
    assert resolve_spec(None) == "builtin:demo"


def test_every_environment_variable_is_in_the_readme():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    names = set()
    for path in [*REPO.glob("engine/**/*.py"), *REPO.glob("tistudio/**/*.py")]:
        names.update(re.findall(r"\b(TISTUDIO_[A-Z_]+)\b", path.read_text(encoding="utf-8")))
    names.update({"HF_HUB_OFFLINE", "CUDA_VISIBLE_DEVICES"})
    missing = sorted(n for n in names if n not in readme)
    assert not missing, f"environment variables missing from the README: {missing}"


def test_progress_is_plain_lines_when_not_a_terminal(capsys):
    from tistudio.commands.progress import RunProgress

    view = RunProgress("r1")
    assert view.plain  # pytest captures stdout: not a terminal
    with view:
        for step in range(10, 260, 10):
            view.update({"type": "step", "step": step, "steps": 250, "loss": 0.5, "steps_per_s": 10.0, "eta": 3})
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"r1 step {s}/250 loss 0.5000 10.0 steps/s, 3s left" for s in (10, 100, 200, 250)]


def test_progress_shows_the_vectors_norm_and_cosine(capsys):
    from tistudio.commands.progress import RunProgress

    with RunProgress("r2") as view:
        view.update({"type": "step", "step": 100, "steps": 100, "loss": 0.25, "steps_per_s": 5.0,
                     "norm": 0.4123, "cos_init": 0.9312})
    assert capsys.readouterr().out.strip() == "r2 step 100/100 loss 0.2500 5.0 steps/s · |v| 0.412 cos 0.931"
