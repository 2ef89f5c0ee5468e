"""A compiled UNet on the warm model: at most one, freed when another shape or mode is asked for
and when the model leaves the worker, and shown by `engine status` (issue 23, item 8).

torch.compile on the CPU takes minutes for a UNet's forward and backward, so torch.compile is
replaced by a stand-in that runs the UNet eagerly and records when each compiled module is made
and released (a weakref finalizer); torch._dynamo.reset is counted, not run."""

from __future__ import annotations

import gc
import weakref
from types import SimpleNamespace

import pytest
import torch

from engine.inversion.compiled import compiled_held, release_compiled
from engine.inversion.train import RunSlot, TrainConfig, train, train_many
from engine.worker.job_kinds import drop_model, held, remember_model


class StandIn:
    """What torch.compile returns here: the UNet, called eagerly."""

    def __init__(self, unet):
        self.unet = unet

    def __call__(self, *args, **kwargs):
        return self.unet(*args, **kwargs)


class CompileWatch:
    def __init__(self, monkeypatch):
        self.made, self.released, self.resets = [], [], 0
        monkeypatch.setattr(torch, "compile", self.compile)
        monkeypatch.setattr(torch._dynamo, "reset", self.reset)

    def compile(self, module, mode=None):
        compiled = StandIn(module)
        weakref.finalize(compiled, self.released.append, len(self.made))
        self.made.append(mode)
        return compiled

    def reset(self):
        self.resets += 1

    def settle(self):
        gc.collect()  # a finished run's objects may sit in reference cycles until a collection
        return self


def _config(token, **overrides):
    settings = dict(init="cat", steps=1, save_every=1, log_every=1, preview_every=0, compile="reduce-overhead")
    return TrainConfig(token=token, **{**settings, **overrides})


@pytest.fixture
def watch(monkeypatch, tiny_model):
    found = CompileWatch(monkeypatch)
    yield found
    release_compiled(tiny_model)  # the session's model leaves as it came


def test_one_compiled_unet_per_shape_and_mode_freed_when_replaced_or_dropped(tiny_model, image_dir, tmp_path, watch):
    images = sorted(image_dir.glob("*.png"))
    train(tiny_model, _config("<a>"), tmp_path / "a", images)
    first = compiled_held(tiny_model)
    assert watch.made == ["reduce-overhead"] and first["batch"] == 1 and first["mode"] == "reduce-overhead"
    train(tiny_model, _config("<b>"), tmp_path / "b", images)  # the same shape again: reused, no warm-up
    assert len(watch.made) == 1 and watch.settle().released == []
    # A sweep of 2 runs doubles the batch: the old compiled UNet and dynamo's products go first.
    train_many(tiny_model, [RunSlot(_config(f"<c{k}>", seed=k), tmp_path / f"c{k}", images) for k in (0, 1)])
    assert len(watch.made) == 2 and watch.settle().released == [0] and watch.resets == 1
    assert compiled_held(tiny_model)["batch"] == 2
    train(tiny_model, _config("<d>", compile="default"), tmp_path / "d", images)  # another mode: the same
    assert watch.made[-1] is None and watch.settle().released == [0, 1] and watch.resets == 2
    # A warm model that leaves the worker takes its compiled UNet along.
    cache = {}
    remember_model(cache, tiny_model, "builtin:tiny")
    assert held(cache)["compiled_unet"]["mode"] == "default"
    drop_model(cache)
    assert cache == {} and compiled_held(tiny_model) is None
    assert watch.settle().released == [0, 1, 2] and watch.resets == 3


def test_engine_status_says_what_an_idle_worker_holds(tiny_model, image_dir, tmp_path, watch):
    from engine.server.scheduler import describe_worker
    from engine.worker.main import Worker
    from tistudio.commands.engine_cmds import _worker

    worker = Worker(tmp_path, out=None, placement={"device": "cpu"})
    assert worker.device_report().get("held") is None  # nothing loaded yet
    remember_model(worker.cache, tiny_model, "builtin:tiny")
    assert worker.device_report()["held"] == {"model": "builtin:tiny", "dtype": "float32"}
    train(tiny_model, _config("<a>"), tmp_path / "a", sorted(image_dir.glob("*.png")))
    report = worker.device_report()
    assert report["held"]["compiled_unet"] == {"mode": "reduce-overhead", "batch": 1, "resolution": 64,
                                               "low_vram": False}
    # The scheduler passes it on in `workers`, and the CLI prints it.
    slot = SimpleNamespace(index=0, device="cpu", task=None, last_step=None, supervisor=SimpleNamespace(
        pid=42, backend="local", node=None, memory=lambda: {}))
    described = describe_worker(slot, {**report, "source": "worker"})
    assert described["held"] == report["held"] and described["state"] == "idle"
    line = _worker(described)
    assert "holds builtin:tiny (float32) + compiled UNet (reduce-overhead, batch 1, 64 px)" in line
