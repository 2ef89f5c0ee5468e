"""What the training step must do on a real GPU, checked on the CPU (issue 23: host syncs,
fp16 loss scaling across a resume, the per-job VRAM peak, --deterministic).

A CPU has no host/device boundary to time and no sync to count, so these tests check the
mechanisms that make the GPU behave: where tensors come from and go, which loss is
backpropagated, which calls happen when.  bench/measure.py's `sync-error` and `resume-fp16`
variants check the same on the first GPU lent to the project.
"""

from __future__ import annotations

import io
import os

import pytest
import torch
from torch.overrides import TorchFunctionMode

from engine.errors import UserError
from engine.inversion.optim import FP16_SCALE, RowAdamW
from engine.inversion.staging import Staging
from engine.inversion.train import Inversion, QuietReporter, RunSlot, TrainConfig, train
from engine.store import checkpoints


def _images(image_dir):
    return sorted(image_dir.glob("*.png"))


def _cfg(**kw):
    return TrainConfig(**{"token": "<thing>", "init": "cat", "steps": 4, "save_every": 2, "preview_every": 0,
                          "log_every": 2, **kw})


def _inversion(model, image_dir, tmp_path, configs) -> Inversion:
    return Inversion(model, [RunSlot(c, tmp_path / f"run{k}", _images(image_dir)) for k, c in enumerate(configs)])


# --- host syncs: one upload per step, indices on the device ------------------------------------


_MOVES = {torch.Tensor.to, torch.Tensor.cuda, torch.Tensor.copy_, torch.Tensor.pin_memory}
_INDEXING = {torch.Tensor.__getitem__, torch.Tensor.index_select, torch.gather, torch.index_select}


class _Provenance(TorchFunctionMode):
    """Follows, while a step draws its batch, which tensors came out of the upload (or were
    computed from it).  On a GPU, each of two things would make the host wait: moving a host
    tensor to the device any other way (a plain `.to(device)` of pageable memory), and indexing
    a tensor that lives on the device (`resident`: the latent cache, the prompt ids) with an
    index made on the host.  On a CPU both still happen as calls, so they are recorded here."""

    def __init__(self, resident: list[torch.Tensor]):
        super().__init__()
        self.resident = {id(t) for t in resident}
        self.uploaded: dict[int, torch.Tensor] = {}  # id -> tensor (held, so ids stay unique)
        self.moves: list[str] = []
        self.host_indices: list[str] = []
        self.uploading = False

    def mark(self, tensor: torch.Tensor) -> None:
        self.uploaded[id(tensor)] = tensor

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _MOVES and not self.uploading and _names_a_device(func, args, kwargs):
            self.moves.append(getattr(func, "__name__", str(func)))
        if func in _INDEXING and id(args[0]) in self.resident:
            for index in _tensors(args[1:]):
                if id(index) not in self.uploaded:
                    self.host_indices.append(getattr(func, "__name__", str(func)))
        out = func(*args, **kwargs)
        if any(id(t) in self.uploaded for t in _tensors(args) + _tensors(kwargs.values())):
            for t in _tensors([out]):
                self.mark(t)
        return out


def _names_a_device(func, args, kwargs) -> bool:
    """A `.to(...)`/`.cuda()`/`.copy_()` that could cross to another device (not a dtype change)."""
    if func is not torch.Tensor.to:
        return True
    return "device" in kwargs or any(isinstance(a, (str, torch.device, torch.Tensor)) for a in args[1:])


def _tensors(items) -> list[torch.Tensor]:
    found = []
    for item in items:
        if isinstance(item, torch.Tensor):
            found.append(item)
        elif isinstance(item, (list, tuple)):
            found += _tensors(item)
    return found


def _watch_steps(inv: Inversion, steps: int) -> tuple[int, _Provenance]:
    """Run `steps` training steps with every draw watched; returns the uploads made and the watcher."""
    resident = [t for c in inv.latents for t in (c.mean, c.std)] + [ids for run in inv.prompt_ids for ids in run]
    watcher = _Provenance(resident)
    uploads = []
    real_upload, real_draw = inv._upload, inv._draw

    def upload(host):
        watcher.uploading = True
        try:
            out = real_upload(host)
        finally:
            watcher.uploading = False
        watcher.mark(out)
        uploads.append(host.numel())
        return out

    def draw(*args):
        with watcher:
            return real_draw(*args)

    inv._upload, inv._draw = upload, draw
    with inv.installed():
        for step in range(steps):
            inv.train_step(step)
    return len(uploads), watcher


@pytest.mark.parametrize("runs, settings", [(1, {}), (2, {"grad_accum": 2, "batch_size": 2}), (3, {})],
                         ids=["one run", "2 runs, accumulating 2 micro-batches of 2", "a sweep of 3"])
def test_a_step_reaches_the_device_in_one_upload_and_indexes_only_with_uploaded_indices(
        tiny_model, image_dir, tmp_path, runs, settings):
    """Issue 23 item 5.  Before, a step moved each run's noise, timesteps, template indices and
    size conditioning separately and indexed the cached latents with host indices: ~9 syncs per
    step on a GPU, 6K+3 for a sweep of K runs.  Now all of it goes in one copy, whatever K and G."""
    inv = _inversion(tiny_model, image_dir, tmp_path, [_cfg(seed=k, **settings) for k in range(runs)])
    uploads, watcher = _watch_steps(inv, steps=2)
    assert uploads == 2, "one upload per optimizer step"
    assert watcher.moves == [], f"host tensors moved outside the step's one upload: {watcher.moves}"
    assert watcher.host_indices == [], f"device tensors indexed with host indices: {watcher.host_indices}"


def test_sdxl_size_conditioning_rides_in_the_same_upload(sdxl_model, image_dir, tmp_path):
    inv = _inversion(sdxl_model, image_dir, tmp_path, [_cfg(center_crop=True)])
    uploads, watcher = _watch_steps(inv, steps=1)
    assert uploads == 1 and watcher.moves == [] and watcher.host_indices == []


def test_the_watcher_sees_a_host_index_and_a_plain_move(tiny_model, image_dir, tmp_path):
    """The check above can fail: the old way of drawing (a host index, a `.to(device)`) is caught."""
    inv = _inversion(tiny_model, image_dir, tmp_path, [_cfg()])
    cache = inv.latents[0]
    watcher = _Provenance([cache.mean, cache.std])
    with watcher:
        index = torch.randint(0, cache.num_images, (1,))
        cache.sample(index, torch.zeros(1, dtype=torch.long), torch.randn(cache.mean.shape[2:]).to(inv.device))
    assert watcher.host_indices and watcher.moves == ["to"]


def test_staging_gives_back_every_part_exactly_in_its_shape_and_dtype():
    staging = Staging()
    parts = [torch.tensor([0, 999, 2**24 - 1]), torch.randn(2, 3, 4), torch.tensor([[1.5, -2.0]]),
             torch.zeros(0, dtype=torch.long)]
    handles = [staging.add(p) for p in parts]
    buffer = staging.pack(pin=False)
    assert buffer.dtype == torch.float32 and buffer.numel() == 3 + 24 + 2
    back = staging.unpack(buffer)
    for handle, part in zip(handles, parts):
        assert back[handle].dtype == part.dtype and torch.equal(back[handle], part)
    with pytest.raises(TypeError, match="int64 and float32"):
        staging.add(torch.zeros(1, dtype=torch.float16))


# --- fp16 loss scaling follows the run's dtype, across a resume ----------------------------------


@pytest.fixture(scope="module")
def fp16_model():
    """builtin:tiny with fp16 weights: slow on a CPU (~1.3 s a step) but real, so one step at most."""
    from engine.sd.models import load_model

    return load_model("builtin:tiny", "cpu", torch.float16)


def _backpropagated(inv: Inversion, monkeypatch) -> tuple[torch.Tensor, torch.Tensor]:
    """One training step: (the [K] loss it returns, the scalar its backward started from)."""
    roots = []
    real = torch.Tensor.backward

    def backward(self, *args, **kwargs):
        roots.append(self.detach().clone())
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "backward", backward)
    with inv.installed():
        loss = inv.train_step(inv.start_step)
    monkeypatch.setattr(torch.Tensor, "backward", real)
    [root] = roots
    return loss.detach(), root


def test_a_run_begun_in_fp32_scales_its_loss_when_resumed_in_fp16(tiny_model, fp16_model, image_dir, tmp_path,
                                                                   monkeypatch):
    """Issue 23 item 6.  Before, the fp32 checkpoint's scale of 1 came back and switched scaling
    off for good: fp16 gradients of small losses underflowed to zero with nothing said."""
    _inversion(tiny_model, image_dir, tmp_path, [_cfg()])._checkpoint(1)  # as an fp32 (or CPU) run saves it
    assert checkpoints.latest(tmp_path / "run0").step == 1
    inv = _inversion(fp16_model, image_dir, tmp_path, [_cfg()])
    assert inv.resume() == 1
    assert inv.state["loss_scale"].tolist() == [FP16_SCALE] and inv.state["scaling"].tolist() == [True]
    loss, root = _backpropagated(inv, monkeypatch)
    assert torch.isfinite(loss).all()
    assert float(root) == pytest.approx(float(loss.sum()) * FP16_SCALE, rel=1e-6)  # the backward is scaled
    assert inv.state["skipped"].tolist() == [0.0]


def test_a_run_begun_in_fp16_does_not_scale_when_resumed_in_fp32(tiny_model, fp16_model, image_dir, tmp_path,
                                                                  monkeypatch):
    _inversion(fp16_model, image_dir, tmp_path, [_cfg()])._checkpoint(1)  # saves scale 2**16, scaling on
    inv = _inversion(tiny_model, image_dir, tmp_path, [_cfg()])
    inv.resume()
    assert inv.state["loss_scale"].tolist() == [1.0] and inv.state["scaling"].tolist() == [False]
    loss, root = _backpropagated(inv, monkeypatch)
    assert float(root) == pytest.approx(float(loss.sum()), rel=1e-6)


def test_scaling_is_a_flag_of_its_own_and_a_same_dtype_resume_keeps_the_state_exactly(tmp_path):
    opt = RowAdamW()
    state = opt.init_state(torch.zeros(3, 4), scaling=True)
    state["loss_scale"] = torch.tensor([4.0, 2.0, 1024.0])
    state["good_steps"] = torch.tensor([5.0, 1999.0, 7.0])
    grad = torch.ones(3, 4)
    grad[0, 0] = float("inf")  # row 0 overflows
    opt.step(torch.zeros(3, 4), grad, state, lr=1e-3)
    # halved (never below 2), still scaling; row 1 grew after its 2000th good step; a scale is not a switch
    assert state["loss_scale"].tolist() == [2.0, 4.0, 1024.0] and state["scaling"].all()
    fp32 = opt.init_state(torch.zeros(1, 4), scaling=False)
    opt.step(torch.zeros(1, 4), torch.full((1, 4), float("inf")), fp32, lr=1e-3)
    assert fp32["loss_scale"].tolist() == [1.0] and fp32["skipped"].tolist() == [1.0]

    vectors, generator = torch.zeros(3, 4), torch.Generator().manual_seed(0)
    for row in range(3):
        checkpoints.save_row(tmp_path / f"r{row}", 1, row, vectors, state, generator)
    restored = opt.init_state(torch.zeros(3, 4), scaling=True)
    for row in range(3):
        checkpoints.restore_row(checkpoints.latest(tmp_path / f"r{row}"), row, vectors, restored, generator)
    opt.use_scaling(restored, True)
    for key in checkpoints.ROW_KEYS:
        assert torch.equal(restored[key], state[key]), key


def test_a_format_2_checkpoint_scaled_while_its_scale_was_not_1(tmp_path):
    """Checkpoints written before the flag existed resume by the rule they were trained with."""
    from safetensors.torch import load_file, save_file

    opt = RowAdamW()
    for scale, scaled in ((1.0, False), (8192.0, True)):
        state = opt.init_state(torch.zeros(1, 2), scaling=scaled)
        state["loss_scale"].fill_(scale)
        path = checkpoints.save_row(tmp_path / str(scale), 3, 0, torch.zeros(1, 2), state, torch.Generator()) / (
            checkpoints.STATE_FILE)
        save_file({k: v for k, v in load_file(str(path)).items() if k != "scaling"}, str(path))  # as format 2 was
        restored = opt.init_state(torch.zeros(1, 2), scaling=not scaled)
        checkpoints.restore_row(checkpoints.latest(tmp_path / str(scale)), 0, torch.zeros(1, 2), restored,
                                torch.Generator())
        assert restored["scaling"].tolist() == [scaled] and restored["loss_scale"].tolist() == [scale]


# --- vram_peak is the job's own -------------------------------------------------------------------


def test_the_worker_resets_the_memory_peak_before_every_job(tmp_path, monkeypatch):
    """Issue 23 item 9: `vram_peak` was torch's peak since the worker started, earlier jobs' included."""
    from engine.devices import runtime
    from engine.store.runs import create_run
    from engine.wire import protocol
    from engine.worker import main as worker_main

    calls = []
    monkeypatch.setattr(runtime, "reset_peak_memory", lambda device: calls.append(("reset", device)))

    def handler(ctx):
        calls.append(("job", ctx.run_id))
        return {}

    monkeypatch.setattr(worker_main, "load_handler", lambda kind: handler)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)  # the worker sets it for its process
    worker = worker_main.Worker(tmp_path, io.BytesIO(), placement={"device": "cuda:1"})
    runs = [create_run(tmp_path, {"kind": "echo", "concept": None, "params": {}}) for _ in range(2)]
    for run_dir in runs:
        finished = worker.run_job(protocol.JobSpec(run_dir.name, str(run_dir), "echo"))
        assert finished.status == "done"
    assert calls == [("reset", "cuda:1"), ("job", runs[0].name), ("reset", "cuda:1"), ("job", runs[1].name)]


def test_reset_peak_memory_touches_cuda_only_once_it_has_started(monkeypatch):
    from engine.devices.runtime import reset_peak_memory

    reset, started = [], {"yes": False}
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset.append)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: started["yes"])
    reset_peak_memory("cuda:1")  # a job that has not started CUDA: no peak yet, and no context opened
    reset_peak_memory(torch.device("cpu"))
    started["yes"] = True
    reset_peak_memory("cuda:1")
    reset_peak_memory("cpu")
    assert reset == [torch.device("cuda:1")]


# --- --deterministic --------------------------------------------------------------------------------


class _FlagWatcher(QuietReporter):
    """Records whether torch's deterministic algorithms were on at each event of the run."""

    def emit(self, type: str, **fields) -> None:
        super().emit(type, deterministic_now=torch.are_deterministic_algorithms_enabled(), **fields)


def test_deterministic_is_on_for_the_training_and_as_before_after_it(tiny_model, image_dir, tmp_path, monkeypatch):
    from engine.inversion import train as train_mod

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    peaks = []
    monkeypatch.setattr(train_mod, "reset_peak_memory", peaks.append)
    assert not torch.are_deterministic_algorithms_enabled()
    reporter = _FlagWatcher()
    train(tiny_model, _cfg(steps=2, deterministic=True), tmp_path / "run", _images(image_dir), reporter)
    assert not torch.are_deterministic_algorithms_enabled()
    assert reporter.events and all(e["deterministic_now"] for e in reporter.events)
    header = next(e for e in reporter.events if e["type"] == "train")
    assert header["deterministic"] is True and header["cublas_workspace_config"] == ":4096:8"
    assert peaks == [tiny_model.device]  # the training's own vram_peak

    plain = _FlagWatcher()
    train(tiny_model, _cfg(steps=2), tmp_path / "plain", _images(image_dir), plain)
    assert not any(e["deterministic_now"] for e in plain.events)
    assert next(e for e in plain.events if e["type"] == "train")["deterministic"] is False


def test_deterministic_is_restored_after_a_failure_and_refuses_a_nondeterministic_cublas(
        tiny_model, image_dir, tmp_path, monkeypatch):
    from engine.inversion import train as train_mod

    def broken(self, batch):
        raise RuntimeError("boom")

    monkeypatch.setattr(train_mod.Inversion, "_loss_rows", broken)
    with pytest.raises(RuntimeError, match="boom"):
        train(tiny_model, _cfg(steps=2, deterministic=True), tmp_path / "run", _images(image_dir))
    assert not torch.are_deterministic_algorithms_enabled()
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":0:0")  # on a machine with CUDA: refused before any work
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(UserError, match="--deterministic needs CUBLAS_WORKSPACE_CONFIG=:4096:8"):
        train(tiny_model, _cfg(steps=2, deterministic=True), tmp_path / "run2", _images(image_dir))
    assert not torch.are_deterministic_algorithms_enabled()


def test_deterministic_is_a_setting_every_front_end_passes(tiny_model, image_dir, tmp_path):
    from tistudio.cli import build_parser
    from tistudio.commands.train_cmds import train_params

    with pytest.raises(UserError, match="--deterministic is on or off"):
        _cfg(deterministic="yes").validate()
    with pytest.raises(UserError, match="batched runs must share --deterministic"):
        _inversion(tiny_model, image_dir, tmp_path, [_cfg(), _cfg(deterministic=True)])
    parser = build_parser()
    assert train_params(parser.parse_args(["train", "toy", "--deterministic"]))["deterministic"] is True
    assert train_params(parser.parse_args(["train", "toy"]))["deterministic"] is False
    for kind, extra in (("seeds", ["--seeds", "1,2"]), ("init", ["--words", "cat,dog"]), ("regularize", [])):
        args = parser.parse_args(["experiment", kind, "toy", *extra, "--deterministic"])
        assert args.deterministic is True, kind


def test_the_worker_gives_cublas_its_deterministic_workspace_before_any_job(tmp_path, monkeypatch):
    from engine.worker import main as worker_main

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    worker_main.Worker(tmp_path, io.BytesIO(), placement={"device": "cpu"})
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # the user's own value is kept
    worker_main.Worker(tmp_path, io.BytesIO(), placement={"device": "cpu"})
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


def test_a_script_that_started_cuda_first_is_told_the_cublas_setting_came_late(monkeypatch):
    """Outside a worker (a notebook) nobody set the variable before CUDA started: it is set now,
    and the header says it may not count."""
    from engine.devices.determinism import deterministic

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with deterministic(True) as fields:
        assert torch.are_deterministic_algorithms_enabled()
    assert not torch.are_deterministic_algorithms_enabled()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert "before CUBLAS_WORKSPACE_CONFIG was set" in fields["deterministic_note"]
    with deterministic(True) as fields:  # now it was set before: nothing to say
        pass
    assert "deterministic_note" not in fields
