"""One zygote for every engine the suite starts (engine.server.zygote, `--listen`).

Each test's engine would otherwise start a zygote of its own and import torch, diffusers and
transformers in it again: ~8 CPU-seconds, 25 times a suite.  The pytest process that runs the
session (under pytest-xdist, the controller, before its workers start) starts this one and names
its socket in TISTUDIO_ZYGOTE; every engine, whatever test starts it, inherits that and forks its
workers there.  It is started as a user would start one by hand (this pytest's environment, not
an engine's), preloads at once, and dies with this pytest.  The zygote's own tests
(tests/test_zygote.py) give their engines zygotes of their own.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from engine.server.zygote import SHARED_ENV

_started: tuple[subprocess.Popen, Path] | None = None


def start() -> None:
    global _started
    folder = Path(tempfile.mkdtemp(prefix="tis-z-"))  # short: a Unix socket's path has ~108 bytes
    sock = folder / "zygote.sock"
    with open(folder / "zygote.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "engine.server.zygote", "--home", str(folder),
                                 "--listen", str(sock)], cwd=folder, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT,
                                env=dict(os.environ, TISTUDIO_ENGINE_PID=str(os.getpid())))
    deadline = time.monotonic() + 30
    while not sock.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    if not sock.exists():  # the engines start their own zygotes, as they do outside the suite
        proc.kill()
        shutil.rmtree(folder, ignore_errors=True)
        return
    _started = proc, folder
    os.environ[SHARED_ENV] = str(sock)


def stop() -> None:
    global _started
    if _started is None:
        return
    proc, folder = _started
    proc.kill()
    proc.wait()
    shutil.rmtree(folder, ignore_errors=True)
    os.environ.pop(SHARED_ENV, None)
    _started = None
