"""`--deterministic`: the same bits on every run, on a GPU too.

On a CPU our training is bit for bit reproducible as it is: a resumed run ends where the
uninterrupted one ends, a batched run where its solo run does.  On CUDA it is not, unless
asked: cuBLAS and attention pick kernels by shape and workspace, and several backward
kernels add in whatever order their threads finish.  `deterministic(True)` turns on torch's
deterministic algorithms for a block (an op that has none then raises, naming itself), and
cuBLAS needs `CUBLAS_WORKSPACE_CONFIG=:4096:8`, which it reads once, when it starts: so the
worker sets it when it starts (`prepare_process`), before any job can touch CUDA.

Without the flag, GPU checks compare a resumed (or batched) run's vectors with
`CUDA_TOLERANCE`; with it, exactly.  Torch-free to import: the worker calls `prepare_process`
before it knows whether a job will ever load torch.
"""

from __future__ import annotations

import contextlib
import os

CUBLAS_ENV = "CUBLAS_WORKSPACE_CONFIG"
CUBLAS_DETERMINISTIC = ":4096:8"  # what torch's docs ask for (":16:8" also works: less memory, slower)
DETERMINISTIC_CUBLAS_VALUES = (":4096:8", ":16:8")
# A resumed fp16 run on CUDA without --deterministic ends this close to the uninterrupted one
# (torch.testing.assert_close on the vectors); with --deterministic, equal.
CUDA_TOLERANCE = {"rtol": 1e-3, "atol": 1e-4}


def prepare_process(environ=os.environ) -> None:
    """Give cuBLAS the deterministic workspace setting before CUDA starts in this process, so any
    later job may ask for --deterministic.  A value the user set is kept."""
    environ.setdefault(CUBLAS_ENV, CUBLAS_DETERMINISTIC)


@contextlib.contextmanager
def deterministic(enabled: bool):
    """Torch's deterministic algorithms inside the block when `enabled`, as they were after it.
    Yields the fields the run's header event records about it."""
    if not enabled:
        yield {"deterministic": False}
        return
    import torch

    fields = {"deterministic": True, **_cublas_setting(torch)}
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield fields
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def _cublas_setting(torch) -> dict:
    """The cuBLAS workspace setting this process runs with, set now if nobody has (a script or a
    notebook: the worker set it when it started), and a note when it comes too late to count."""
    from engine.errors import UserError

    value = os.environ.get(CUBLAS_ENV)
    if value is not None and value not in DETERMINISTIC_CUBLAS_VALUES and torch.cuda.is_available():
        raise UserError(f"--deterministic needs {CUBLAS_ENV}={CUBLAS_DETERMINISTIC} (or :16:8), but it is {value!r}; "
                        f"unset it (or set it to {CUBLAS_DETERMINISTIC}) and restart the engine "
                        "(`tistudio engine stop`)")
    fields = {"cublas_workspace_config": value or CUBLAS_DETERMINISTIC}
    if value is None:
        os.environ[CUBLAS_ENV] = CUBLAS_DETERMINISTIC
        if torch.cuda.is_initialized():
            fields["deterministic_note"] = (f"CUDA had started in this process before {CUBLAS_ENV} was set; "
                                            "set it before the process starts for cuBLAS results that repeat")
    return fields
