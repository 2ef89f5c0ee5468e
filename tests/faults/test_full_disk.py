"""A real full disk (a 4 MB tmpfs, filled to the last byte), not one injected failing write.

A full disk refuses every write: the checkpoint, the run's status, run.json, events.jsonl,
the engine's own files.  The promises: the CLI ends within seconds with exit 1 and one
line that names the full disk and what to free; the run ends failed with its last good
checkpoint intact; the engine stays up, answers from memory and says why; and once
space is freed, it writes what it held and serves the next job.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from engine.store import runs as jobs
from engine.wire.client import call
from helpers import kill_engines
from tistudio.cli import main

pytestmark = pytest.mark.timeout(300)

TRAIN = [sys.executable, "-m", "tistudio.cli", "--model", "builtin:tiny", "train", "teapot"]


@pytest.fixture
def small_disk(monkeypatch):
    """A real 4 MB tmpfs as the data home (mounting one needs root or CAP_SYS_ADMIN)."""
    mnt = Path(tempfile.mkdtemp(prefix="tis-disk-"))  # short: the engine's socket lives in it
    try:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(mnt)],
                              capture_output=True, text=True, timeout=30)
        why = proc.stderr.strip() if proc.returncode else None
    except FileNotFoundError:
        why = "there is no mount command"
    if why is not None:
        mnt.rmdir()
        pytest.skip(f"needs a real 4 MB tmpfs and mounting one is not permitted here ({why}); "
                    "run as root or with CAP_SYS_ADMIN")
    monkeypatch.setenv("TISTUDIO_HOME", str(mnt))
    monkeypatch.setenv("TISTUDIO_ENGINE_IDLE", "60")
    yield mnt
    kill_engines(mnt)
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)
    mnt.rmdir()


@pytest.fixture
def teapot(small_disk, image_dir, capsys):
    """The concept, made while there is still room."""
    assert main(["concept", "add", "teapot", "--images", str(image_dir), "--init", "cat"]) == 0, capsys.readouterr()
    return small_disk / "concepts" / "teapot"


def fill(disk: Path) -> Path:
    """Write a filler file until the disk refuses another byte."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        while True:
            try:
                os.write(fd, b"\0" * 65536)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
    finally:
        os.close(fd)
    with pytest.raises(OSError):
        (disk / "probe").write_bytes(b"x")  # really full
    return filler


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    line = lines[0]
    assert "disk is full" in line and "free some space" in line and "Traceback" not in line, line
    return line


def until(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := pred()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return value


def test_a_disk_that_fills_during_training(small_disk, teapot):
    env = dict(os.environ)
    cli = subprocess.Popen(TRAIN + ["--steps", "400", "--save-every", "10"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env=env)
    def first_checkpoint():
        assert cli.poll() is None, f"the CLI ended before the first checkpoint: {cli.communicate()}"
        return next((c.parent.parent for c in teapot.glob("runs/*/checkpoints/step-10")), None)

    try:
        run_dir = until(first_checkpoint, timeout=180, what="the first checkpoint")
        filler = fill(small_disk)
        filled = time.monotonic()
        out, err = cli.communicate(timeout=90)
    finally:
        if cli.poll() is None:
            cli.kill()
    took = time.monotonic() - filled

    # The CLI: exit 1 within seconds, one line that says the disk is full and what to free.
    assert cli.returncode == 1, (out, err)
    assert run_dir.name in one_error_line(err)  # … and how to resume the run
    assert took < 30, f"the CLI took {took:.0f}s to notice"

    # The engine is up, and answers from memory what the disk could not take.
    status = call("status", device=False, start=False)
    run = next(j for j in call("jobs", start=False) if j["id"] == run_dir.name)
    assert run["status"] == "failed" and "disk is full" in run["error"] and run["pid"] is None
    assert not status["storage"]["writable"] and "disk is full" in status["storage"]["error"]
    assert status["storage"]["unsaved"] == [run_dir.name] and run["unsaved"]
    assert jobs.load_run(run_dir)["status"] == "running"  # what the full disk still says
    assert status["running"] is None and status["queue"] == 0

    # The last good checkpoint is whole, and nothing half-written sits under a final name.
    saved = sorted(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*"))
    assert saved and saved == list(range(10, saved[-1] + 1, 10))
    from safetensors.torch import load_file

    for step in saved:
        assert set(load_file(str(run_dir / "checkpoints" / f"step-{step}" / "state.safetensors"))) >= {"vector"}
    assert not list(run_dir.rglob(".*"))  # no temp file or folder left behind
    events = jobs.EventLog(run_dir / "events.jsonl").read()  # a line the disk cut short is skipped …
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))  # … and used up no seq

    # Room again: the engine writes what it held, then resumes the run from its checkpoint.
    filler.unlink()
    until(lambda: call("status", device=False, start=False)["storage"]["writable"], 15, "the held status to be written")
    record = jobs.load_run(run_dir)
    assert record["status"] == "failed" and "disk is full" in record["error"] and record["pid"] is None
    assert jobs.last_status(run_dir) == "failed"
    assert call("submit", resume=run_dir.name, params={"steps": saved[-1] + 10}) == run_dir.name
    assert call("wait", run_dir.name) == "done"
    assert call("status", device=False, start=False)["pid"] == status["pid"]  # the same engine throughout


def test_a_full_disk_refuses_a_new_job_in_one_line_and_leaves_nothing(small_disk, teapot):
    filler = fill(small_disk)
    cli = subprocess.run(TRAIN + ["--steps", "5"], capture_output=True, text=True, timeout=120)
    assert cli.returncode == 1, (cli.stdout, cli.stderr)
    one_error_line(cli.stderr)
    assert not list(teapot.glob("runs/*"))  # no half-made run
    status = call("status", device=False, start=False)  # the engine started anyway, without its pid file
    assert not status["storage"]["writable"] and "disk is full" in status["storage"]["error"]

    filler.unlink()
    cli = subprocess.run(TRAIN + ["--steps", "5", "--save-every", "5", "--preview-every", "0"],
                         capture_output=True, text=True, timeout=180)
    assert cli.returncode == 0, (cli.stdout, cli.stderr)
    assert call("status", device=False, start=False)["pid"] == status["pid"]
    until(lambda: (small_disk / "engine" / "engine.pid").is_file(), 15, "the pid file, once there is room")
