"""SD 2.x single files: 768-px v-prediction or 512-px epsilon (2.x-base), which the weights cannot tell.

Decided by the flags (--prediction-type, --model-resolution), else by a .ckpt's global_step as
diffusers does (875000, SD 2.0-base: epsilon), else guessed v-prediction, and then said in the
job's log.  The choice reaches every consumer of the spec: the worker's cache, the run's record,
the CLI's and the studio's own reading of it, the config file.
"""

from __future__ import annotations

import json

import pytest
import torch
from ldm_layout import pipeline_to_single_file
from safetensors.torch import save_file

from engine.errors import UserError
from engine.sd.models import SD2_BASE_STEP, load_model, model_info
from engine.settings.model import PREDICTION_ENV, RESOLUTION_ENV, ModelOptions, model_params
from engine.worker.job_kinds import job_model
from tistudio.cli import main

TEXT_KEY = "cond_stage_model.model.token_embedding.weight"  # an SD 2.x file's (OpenCLIP) token table


class Context:
    """What warm_model uses of a JobContext: the worker's cache and the job's events."""

    def __init__(self, cache: dict | None = None):
        self.cache = {} if cache is None else cache
        self.events: list[dict] = []

    def emit(self, kind: str, **fields) -> None:
        self.events.append({"type": kind, **fields})

    def warnings(self) -> list[str]:
        return [e["message"] for e in self.events if e.get("level") == "warning"]

    def loads(self) -> int:
        return sum(1 for e in self.events if str(e.get("message", "")).startswith("loading model"))


@pytest.fixture(scope="module")
def sd2_state():
    """builtin:sd2-tiny as one original-layout state dict (what a 2.x .ckpt holds)."""
    return pipeline_to_single_file(load_model("builtin:sd2-tiny").pipe, "sd2")


@pytest.fixture
def clean_env(monkeypatch):
    """The qualifiers' variables empty, and put back after a test whose CLI run sets them."""
    for name in (PREDICTION_ENV, RESOLUTION_ENV):
        monkeypatch.setenv(name, "")


def _ckpt(path, state: dict, **top) -> str:
    torch.save({"state_dict": state, **top}, path)
    return str(path)


def test_a_tiny_sd2_ckpt_predicts_as_its_global_step_or_the_flags_say_and_a_guess_is_said(sd2_state, tmp_path):
    bare = _ckpt(tmp_path / "bare.ckpt", sd2_state)
    base = _ckpt(tmp_path / "base.ckpt", sd2_state, global_step=SD2_BASE_STEP)

    guessed = Context()
    model = job_model(guessed, {"model": bare, "device": "cpu"})
    assert model.pipe.scheduler.config.prediction_type == "v_prediction"
    assert model.noise_scheduler().config.prediction_type == "v_prediction"  # training's target
    assert model.info.identity()["prediction_source"] == "guess"  # what run.json records
    [warning] = guessed.warnings()
    assert "no global_step" in warning and "--prediction-type epsilon" in warning and "\n" not in warning

    flagged = Context(guessed.cache)  # the same worker: a qualified spec is another model
    model = job_model(flagged, {"model": bare, "device": "cpu", "prediction_type": "epsilon", "model_resolution": 128})
    assert flagged.loads() == 1 and flagged.warnings() == []
    assert model.noise_scheduler().config.prediction_type == "epsilon"
    assert (model.info.prediction_source, model.info.resolution) == ("flag", 128)

    stepped = Context(flagged.cache)
    model = job_model(stepped, {"model": base, "device": "cpu"})
    assert model.pipe.scheduler.config.prediction_type == "epsilon" and stepped.warnings() == []
    assert model.info.identity()["prediction_source"] == "global_step"
    again = Context(stepped.cache)
    job_model(again, {"model": base, "device": "cpu"})
    assert again.loads() == 0  # the same spec, the same qualifiers: the warm model


def test_a_real_width_sd2_file_takes_the_512_px_epsilon_config_when_something_says_so(tmp_path):
    """Read from shapes alone (no weights): the bundled sd2-base config (512 px, epsilon) or sd21 (768, v)."""
    table = {TEXT_KEY: torch.zeros(4, 1024)}
    cases = {
        "step.ckpt": (_ckpt(tmp_path / "step.ckpt", table, global_step=SD2_BASE_STEP), None),
        "tensor-step.ckpt": (_ckpt(tmp_path / "tensor-step.ckpt", table, global_step=torch.tensor(110000)), None),
        "bare.safetensors": (str(tmp_path / "bare.safetensors"), None),
        "meta.safetensors": (str(tmp_path / "meta.safetensors"), None),
        "res512": (str(tmp_path / "bare.safetensors"), ModelOptions(resolution=512)),
        "v512": (str(tmp_path / "bare.safetensors"), ModelOptions("v_prediction", 512)),
    }
    save_file(table, cases["bare.safetensors"][0])
    save_file(table, cases["meta.safetensors"][0], metadata={"global_step": str(SD2_BASE_STEP)})
    read = {name: model_info(spec, options) for name, (spec, options) in cases.items()}
    got = {name: (i.config, i.prediction_type, i.resolution, i.prediction_source) for name, i in read.items()}
    assert got == {
        "step.ckpt": ("sd2-base", "epsilon", 512, "global_step"),
        "tensor-step.ckpt": ("sd21", "v_prediction", 768, "guess"),
        "bare.safetensors": ("sd21", "v_prediction", 768, "guess"),
        "meta.safetensors": ("sd2-base", "epsilon", 512, "global_step"),
        "res512": ("sd2-base", "epsilon", 512, "flag"),
        "v512": ("sd21", "v_prediction", 512, "flag"),
    }
    assert "global_step 110000" in read["tensor-step.ckpt"].note
    assert [name for name, info in read.items() if info.note] == ["tensor-step.ckpt", "bare.safetensors"]
    # the qualifiers are part of the model's identity: the fingerprint in records differs
    assert read["res512"].identity()["fingerprint"] != read["bare.safetensors"].identity()["fingerprint"]


def test_the_qualifiers_come_with_the_spec_from_the_environment_only(tmp_path, monkeypatch, clean_env):
    path = str(tmp_path / "bare.safetensors")
    save_file({TEXT_KEY: torch.zeros(4, 1024)}, path)
    monkeypatch.setenv("TISTUDIO_MODEL", path)
    monkeypatch.setenv(PREDICTION_ENV, "epsilon")
    assert model_info().prediction_type == "epsilon"  # the CLI's pre-submit checks read it so
    assert model_info(path).prediction_type == "v_prediction"  # a spec named outright: its own qualifiers
    assert model_params() == {"model": path, "prediction_type": "epsilon"}
    with pytest.raises(UserError, match=r"^--prediction-type 'x' is not a prediction type; give epsilon"):
        ModelOptions.from_params({"prediction_type": "x"})
    with pytest.raises(UserError, match=r"--model-resolution 500 is not a resolution"):
        ModelOptions.from_params({"model_resolution": 500})


def _cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_the_cli_and_the_config_file_qualify_the_model_and_refuse_bad_values_in_one_line(
        capsys, tmp_path, monkeypatch, clean_env):
    with pytest.raises(SystemExit) as exited:  # argparse's own refusal, in our one-line form
        main(["--prediction-type", "x", "config", "show"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.count("\n") == 1 and "--prediction-type: invalid choice: 'x'" in err
    code, _, err = _cli(capsys, "--model-resolution", "500", "config", "show")
    assert code == 2 and err.count("\n") == 1 and "500 is not a resolution" in err

    code, out, _ = _cli(capsys, "--prediction-type", "epsilon", "--model-resolution", "512", "config", "show", "--json")
    shown = json.loads(out)
    assert code == 0 and (shown["prediction_type"], shown["model_resolution"]) == ("epsilon", 512)

    config = tmp_path / "config"
    config.mkdir(exist_ok=True)
    monkeypatch.delenv("TISTUDIO_MODEL")
    for name in (PREDICTION_ENV, RESOLUTION_ENV):
        monkeypatch.setenv(name, "")
    (config / "config.toml").write_text('model = "builtin:sd2-tiny"\nprediction_type = "epsilon"\n')
    code, out, _ = _cli(capsys, "config", "show", "--json")
    assert code == 0 and json.loads(out)["prediction_type"] == "epsilon"
    for name in (PREDICTION_ENV, RESOLUTION_ENV):
        monkeypatch.setenv(name, "")
    code, out, _ = _cli(capsys, "--model", "builtin:tiny", "config", "show", "--json")
    assert code == 0 and "prediction_type" not in json.loads(out)  # the file's qualify the file's model only

    (config / "config.toml").write_text('model = "builtin:sd2-tiny"\nmodel_resolution = "big"\n')
    code, _, err = _cli(capsys, "config", "show")
    assert code == 2 and err.count("\n") == 1 and "config.toml: model_resolution 'big' is not a resolution" in err


async def test_the_studio_sends_the_qualifiers_and_its_palette_changes_them(tmp_path, monkeypatch, clean_env):
    import asyncio

    from tistudio.app import StudioApp

    monkeypatch.setenv(PREDICTION_ENV, "epsilon")  # as the CLI sets it from --prediction-type or the config file
    app = StudioApp(tmp_path / "home", "builtin:sd2-tiny", engine=False, image_protocol="halfblock", add_sample=False)
    assert app.model_params() == {"model": "builtin:sd2-tiny", "prediction_type": "epsilon"}  # every job it submits

    async def until(predicate) -> None:
        for _ in range(50):
            if predicate():
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"still {app.model_reading!r}")

    async with app.run_test(size=(100, 24)):
        await until(lambda: app.model_reading.startswith("epsilon"))
        assert "as asked" in app.model_reading and "epsilon" in "\n".join(app.describe_settings())
        own = next(c for c in app.get_system_commands(app.screen) if c.title == "Model: prediction type from the model")
        own.callback()
        await until(lambda: app.model_reading.startswith("v_prediction"))
        assert app.model_params() == {"model": "builtin:sd2-tiny"}
