"""The CLIP judge: the activation its weights were trained with, and a lifetime that never
overlaps training or generation (issue 23, items 2 and 7).  Nothing is downloaded: networks
are built with random weights (on the meta device where only their layers matter)."""

from __future__ import annotations

import json
import weakref
from pathlib import Path

import pytest
import torch
from open_clip.transformer import QuickGELU

from engine.errors import UserError
from engine.inversion import judge as judge_module
from engine.inversion.judge import build_network, prepare_judge, resolve_clip
from engine.inversion.metrics import evaluate
from engine.sd.formats import write_embedding
from engine.store import runs as jobs
from engine.store.library import Library
from engine.store.paths import atomic_write_json, home_dir
from engine.worker.context import JobContext
from engine.worker.job_kinds import handle_experiment, remember_model


def _activations(spec) -> tuple[int, int]:
    """(QuickGELU, nn.GELU) modules in the network `spec` builds (on meta: layers, no weights)."""
    with torch.device("meta"):
        network, _ = build_network(spec, device="meta")
    modules = list(network.modules())
    return sum(isinstance(m, QuickGELU) for m in modules), sum(isinstance(m, torch.nn.GELU) for m in modules)


# --- which network -------------------------------------------------------------------------------


def test_a_quickgelu_tag_builds_quickgelu_layers_and_a_gelu_tag_does_not():
    openai = resolve_clip("ViT-B-32:openai")  # the default judge for real models
    assert openai.quick_gelu and "openai" in openai.activation_from
    assert _activations(openai) == (24, 0)  # 12 visual + 12 text blocks
    laion = resolve_clip("ViT-B-32:laion2b_s34b_b79k")
    assert not laion.quick_gelu and _activations(laion) == (0, 24)
    assert resolve_clip("ViT-B-32-quickgelu:laion400m_e32").quick_gelu  # the name itself asks for it


def test_local_weights_take_the_activation_from_the_tag_or_their_folder(tmp_path):
    file = tmp_path / "clip" / "open_clip_model.safetensors"
    file.parent.mkdir()
    file.write_bytes(b"not read by resolve_clip")
    plain = resolve_clip("ViT-B-32", file)  # a bare file cannot say: GELU, and the report says how to ask
    assert not plain.quick_gelu and "--clip ViT-B-32:openai" in plain.activation_from
    tagged = resolve_clip("ViT-B-32:openai", file)  # OpenAI's weights, kept locally
    assert tagged.quick_gelu and tagged.weights == file and _activations(tagged) == (24, 0)
    assert resolve_clip("ViT-B-32-quickgelu", file.parent).quick_gelu
    (file.parent / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": {"quick_gelu": True}, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.25] * 3}}))
    hub_folder = resolve_clip("ViT-B-32", file.parent)  # open_clip's hub folders say it themselves
    assert hub_folder.quick_gelu and hub_folder.preprocess == {"image_mean": (0.5,) * 3, "image_std": (0.25,) * 3}
    with pytest.raises(UserError, match="no pretrained tag 'nope'; known: openai"):
        resolve_clip("ViT-B-32:nope")
    with pytest.raises(UserError, match="unknown CLIP model 'ViT-Nope'"):
        resolve_clip("ViT-Nope:openai")
    with pytest.raises(UserError, match="unknown built-in CLIP 'builtin:sd2-tiny'; choose builtin:tiny"):
        resolve_clip("builtin:sd2-tiny")


def test_weights_that_do_not_fit_are_refused_before_anything_is_built(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    save_file({"visual.conv1.weight": torch.zeros(1)}, str(tmp_path / "wrong.safetensors"))
    watch = JudgeWatch(monkeypatch)
    with pytest.raises(UserError, match="does not fit CLIP ViT-B-32"):
        prepare_judge("ViT-B-32", tmp_path / "wrong.safetensors")
    assert watch.built == 0


# --- how long it lives ----------------------------------------------------------------------------


class JudgeWatch:
    """Records every judge built (through judge.build_clip) and whether it is still alive."""

    def __init__(self, monkeypatch):
        self.built, self.refs, self.released = 0, [], []
        real = judge_module.build_clip

        def build(spec, device="cpu"):
            clip = real(spec, device)
            self.built += 1
            self.refs.append(weakref.ref(clip.model))
            weakref.finalize(clip.model, self.released.append, self.built)
            return clip

        monkeypatch.setattr(judge_module, "build_clip", build)

    def alive(self) -> int:
        return sum(ref() is not None for ref in self.refs)


def _watch_calls(monkeypatch, module, name: str, watch: JudgeWatch, seen: list) -> None:
    """Wrap module.name so each call records how many judges were alive when it ran."""
    real = getattr(module, name)

    def wrapped(*args, **kwargs):
        seen.append((name, watch.alive()))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)


@pytest.fixture
def library(image_dir):
    lib = Library(home_dir())
    lib.add("cat", image_dir, "cat", description="a small grey cat")
    return lib


def test_evaluation_generates_everything_before_the_judge_is_built_and_frees_it(tiny_model, library, monkeypatch):
    from engine.inversion import metrics

    concept = library.get("cat")
    run_dir = concept.runs_dir / "r1"
    write_embedding(run_dir / "learned_embeds.safetensors", torch.randn(1, 32), concept.token)
    atomic_write_json(run_dir / "run.json", {"id": "r1", "status": "done", "created": 1.0, "steps": 1})
    watch, seen = JudgeWatch(monkeypatch), []
    _watch_calls(monkeypatch, metrics, "generate", watch, seen)
    table = evaluate(tiny_model, library, "cat", images=1, prompts_file=None, clip="builtin:tiny", sample_steps=1)
    assert [name for name, _ in seen] == ["generate"] * 8  # 2 rows x (reconstruction + 3 edit prompts)
    assert all(alive == 0 for _, alive in seen), seen
    assert watch.built == 1 and watch.released == [1] and watch.alive() == 0
    assert table["clip"]["activation"] == "GELU"  # the tiny judge's own config
    assert "CLIP builtin:tiny, GELU: the built-in CLIP's config" in Path(table["table_md"]).read_text()


def test_an_experiment_builds_its_judge_after_training_and_generation_and_frees_it(
        tiny_model, library, monkeypatch):
    from engine.inversion import metrics
    from engine.worker import experiments

    watch, seen = JudgeWatch(monkeypatch), []
    _watch_calls(monkeypatch, experiments, "train_sweep", watch, seen)
    _watch_calls(monkeypatch, metrics, "generate", watch, seen)
    spec = {"kind": "experiment", "concept": "cat", "params": {
        "model": "builtin:tiny", "kind": "seeds", "values": [0], "steps": 1, "prompts": ["a {} in space"],
        "images": 1, "clip": "builtin:tiny", "sample_steps": 1}}
    run_dir = jobs.create_run(library.home, spec)
    ctx = JobContext(spec, run_dir.name, run_dir, library.home)
    remember_model(ctx.cache, tiny_model, "builtin:tiny")
    result = handle_experiment(ctx)
    assert [name for name, _ in seen] == ["train_sweep", "generate", "generate"], seen
    assert all(alive == 0 for _, alive in seen), seen
    assert watch.built == 1 and watch.released == [1] and watch.alive() == 0
    assert result["clip"]["name"] == "builtin:tiny" and result["clip"]["activation"] == "GELU"
    markdown = (library.get("cat").path / "experiments" / result["id"] / "table.md").read_text()
    assert "- Judge: CLIP builtin:tiny, GELU" in markdown
