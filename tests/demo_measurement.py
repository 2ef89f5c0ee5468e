"""One cell of the demo's frontier (tests/test_demo.py), measured again beside the rest of the suite.

The README's table of every method over seeds comes from `python -m demo.frontier`
(demo/logs/frontier-*.json: 70 runs, hours of CPU).  The suite re-runs one cell of it: the
paper's inversion (`none`) at seed 1 on mushroom, trained at the logged protocol (1000 steps,
lr 5e-4) and measured with 16 images a set, and its test checks that the numbers equal the logged
ones and beat the SD row.  About two CPU-minutes: the run, then its measured column
(`--no-baseline`: the SD row depends on no training; the log holds it).  `make test-study`
(STUDY_ENV set) measures halftone's cell too, trained in the same batch: a minute more of CPU
that `make test`, CPU-bound on two cores, spends on the rest.
The other tests leave a core idle some of the time (they wait on engines, workers and the
studio), so the measurement starts when the suite starts, in a process of its own at a lower
priority and on one thread, and its test only waits for the results and checks them.  Run
alone, the test starts it and waits.

Who starts it: a plain `pytest` run, once it has collected more than that test
(conftest.pytest_collection_finish); under pytest-xdist (`make test` runs `-n`), the
controller, which runs no test itself, for a whole-suite run (conftest.pytest_configure).  Its
workers find the measurement's folder in FOLDER_ENV and wait on its results file there; the
process that started it stops it when the session ends.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEST_ID = "tests/test_demo.py::test_the_papers_inversion_on_the_demo_reproduces_its_logged_frontier_cell"
# The cell: demo/logs/frontier-<concept>.json's protocol, its `none` method at one of its seeds.
STUDY_ENV = "TISTUDIO_TEST_STUDY"  # `make test-study`: tests/test_demo.py's STUDY_ENV
CONCEPTS = ("mushroom", "halftone") if os.environ.get(STUDY_ENV) else ("mushroom",)
METHOD, SEED = "none", 1
STEPS, LR, IMAGES = 1000, 5e-4, 16
NICENESS = 10  # the other tests' processes come first when both want a core
FOLDER_ENV = "TISTUDIO_TEST_DEMO_MEASUREMENT"  # the running measurement's folder, for xdist's workers


class Measurement:
    """The measurement's process, started here (`Measurement()`) or by another pytest process
    (`Measurement(folder)`: the folder it runs in, named by FOLDER_ENV)."""

    def __init__(self, folder: Path | None = None):
        self.folder = folder or Path(tempfile.mkdtemp(prefix="tis-demo-"))
        self.out, self.log = self.folder / "results.json", self.folder / "measurement.log"
        self.pid_file = self.folder / "pid"
        self.proc = None  # ours to wait on and stop, when this process started it
        if folder is None:
            self.proc = self._start()
            self.pid_file.write_text(str(self.proc.pid))
            os.environ[FOLDER_ENV] = str(self.folder)  # before xdist starts its workers: they inherit it

    def _start(self) -> subprocess.Popen:
        argv = [sys.executable, "-m", "demo.frontier", "--concepts", ",".join(CONCEPTS), "--methods", METHOD,
                "--seeds", str(SEED), "--steps", str(STEPS), "--lr", str(LR), "--images", str(IMAGES),
                "--no-baseline", "--threads", "1", "--out", str(self.out), "--home", str(self.folder / "home")]
        with open(self.log, "wb") as log:
            return subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True,
                                    env=dict(os.environ, OMP_NUM_THREADS="1"),
                                    preexec_fn=_lower_priority_and_die_with_the_suite)

    def results(self, timeout: float) -> dict:
        """The measurement's results ({concept: result}); AssertionError with its log if it failed."""
        if self.proc is not None:
            code = self.proc.wait(timeout)
        else:  # another process's child: its results file (written atomically) or its end
            deadline, pid = time.monotonic() + timeout, int(self.pid_file.read_text())
            while not self.out.exists() and _running(pid):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the demo measurement ({self.folder}) did not end in {timeout:.0f} s")
                time.sleep(1)
            code = 0 if self.out.exists() else "without results"
        assert code == 0 and self.out.exists(), f"the demo measurement exited {code}:\n{self.log.read_text()[-4000:]}"
        return json.loads(self.out.read_text())

    def stop(self) -> None:
        if self.proc is None:  # another process's: it stops it
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        os.environ.pop(FOLDER_ENV, None)
        shutil.rmtree(self.folder, ignore_errors=True)


def _running(pid: int) -> bool:
    """Whether a process that is not our child still runs (a zombie, waiting for its parent to
    reap it, has ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _lower_priority_and_die_with_the_suite() -> None:
    os.nice(NICENESS)
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: a killed pytest takes it along
    except (OSError, AttributeError):
        pass


_started: Measurement | None = None


def start() -> Measurement:
    """The measurement this process runs or shares: the one FOLDER_ENV names, else its own."""
    global _started
    if _started is None:
        shared = os.environ.get(FOLDER_ENV)
        _started = Measurement(Path(shared)) if shared else Measurement()
    return _started


def stop() -> None:
    global _started
    if _started is not None:
        _started.stop()
        _started = None
