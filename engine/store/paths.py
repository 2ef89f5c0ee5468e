"""Where things live on disk, and how they are written there (atomically).

Every file the engine writes goes through `atomic_write_*`: a temp file in
the same directory, fsync, then `os.replace`.  A reader never sees half a
file under its final name, even if the process is killed mid-write.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from engine.faults import maybe_fault

APP_NAME = "tistudio"


def home_dir(override: str | os.PathLike | None = None) -> Path:
    """The data directory: --home, else $TISTUDIO_HOME, else XDG data dir."""
    import platformdirs  # here: a process that only reads configs (the bench runner) may lack it

    raw = override or os.environ.get("TISTUDIO_HOME") or platformdirs.user_data_dir(APP_NAME)
    path = Path(raw).expanduser().resolve()
    ensure_private_dir(path)
    return path


def config_dir() -> Path:
    import platformdirs

    raw = os.environ.get("TISTUDIO_CONFIG_DIR") or platformdirs.user_config_dir(APP_NAME)
    return Path(raw).expanduser()


def ensure_private_dir(path: Path) -> Path:
    """Create `path` (and parents) readable by the user alone (0700)."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    with contextlib.suppress(PermissionError):
        os.chmod(path, 0o700)
    return path


@contextlib.contextmanager
def atomic_path(final: os.PathLike | str, suffix: str = "") -> Iterator[Path]:
    """Yield a temp path beside `final`; on success fsync it and rename it over `final`.

    On any exception the temp file is removed and `final` is untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=suffix + ".tmp", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        maybe_fault("write." + final.name)  # crash tests: die with the data written but not renamed
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp_path, 0o600)
        os.replace(tmp_path, final)
        _fsync_dir(final.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(final: os.PathLike | str, data: bytes) -> None:
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(final: os.PathLike | str, text: str) -> None:
    atomic_write_bytes(final, text.encode("utf-8"))


def atomic_write_json(final: os.PathLike | str, obj: Any) -> None:
    atomic_write_text(final, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: os.PathLike | str) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


# --- a full disk ---------------------------------------------------------------------------------

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_DISK_FULL_WORDS = (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT))  # "No space left on device" …


def is_disk_full(exc: BaseException) -> bool:
    """True for the error a full disk (or a spent quota) raises on a write: an OSError, or a
    library's own error that quotes the OS (safetensors writes in Rust and raises
    SafetensorError "… No space left on device (os error 28)")."""
    if isinstance(exc, OSError):
        return exc.errno in _DISK_FULL
    return any(words in str(exc) for words in _DISK_FULL_WORDS)


def disk_full_message(path: os.PathLike | str, then: str) -> str:
    """One line for a user whose disk is full: where, how much is left, what to free, and
    `then`, what to do once there is room (e.g. "resume this run")."""
    try:
        free = _size(shutil.disk_usage(path).free)
    except OSError:
        free = "no space"
    return (f"the disk is full ({path} has {free} free): free some space there "
            f"(old runs' checkpoints and outputs/ are the largest things tistudio keeps), then {then}")


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
