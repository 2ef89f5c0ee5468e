"""The GPU benchmark, proven on the CPU before any device time is spent.

bench/device.py runs end to end on builtin:tiny from the wheels `make wheels` builds, under a
Python shaped like the lent GPU machine's: its site-packages holds only the packages that
machine's image has (bench.wheels.DEVICE_PACKAGES, as installed here, with what they need
here), so diffusers, open_clip and the rest can only come from the carried wheels.  The runner
there runs a few variants (each child's start-up costs ~10 s); every variant's measure runs
under that same Python and wheels in one process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

from bench import run, wheels
from bench.device import install
from bench.variants import BY_NAME, MODELS, VARIANTS, select

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--steps", "2", "--warmup", "1", "--gen-images", "1", "--eval-images", "1", "--sample-steps", "2"]


def device_like_python(folder: Path) -> Path:
    """A venv whose site-packages links this environment's copies of the device image's packages
    (and their own requirements here), never a carried one: a bare GPU machine's python3."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    site = next(folder.glob("lib/python*/site-packages"))
    dists = {wheels.canonical(d.metadata["Name"]): d for d in metadata.distributions()}
    todo = [name for name in dists if name in wheels.DEVICE_PACKAGES]
    chosen = set(todo)
    while todo:
        for line in dists[todo.pop()].requires or []:
            req = wheels.parse_requirement(line)
            name = wheels.canonical(req.name)
            if (req.marker is None or req.marker.evaluate({"extra": ""})) and name in dists \
                    and name not in chosen and name not in wheels.CARRIED:
                chosen.add(name)
                todo.append(name)
    for name in chosen:
        dist = dists[name]
        assert dist.files is not None, f"{name} has no RECORD; cannot tell its files"
        for top in {f.parts[0] for f in dist.files if f.parts[0] != ".."}:
            link, source = site / top, Path(dist.locate_file(top))
            if source.exists() and not link.exists():
                link.symlink_to(source)
    return folder / "bin" / "python"


@pytest.fixture(scope="module")
def built_wheels():
    proc = subprocess.run(["make", "wheels", f"PYTHON={sys.executable}"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "travels: tree" in proc.stdout
    return ROOT / ".whl"


@pytest.fixture(scope="module")
def device_python(tmp_path_factory):
    return device_like_python(tmp_path_factory.mktemp("device-python"))


def bench_env(tmp_path: Path, **extra) -> dict:
    # the device sets no PYTHONPATH, and has no zygote of the suite's (tests/shared_zygote.py)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TISTUDIO_ZYGOTE")}
    env.update(OMP_NUM_THREADS="1", TMPDIR=str(tmp_path), TISTUDIO_CACHE=str(tmp_path / "cache"), **extra)
    return env


def read_lines(out: Path) -> tuple[dict, dict]:
    (path,) = out.glob("*.jsonl")
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0]["environment"] is True
    return lines[0], {line["variant"]: line for line in lines[1:]}


def test_the_device_python_lacks_what_the_wheels_carry(device_python, tmp_path):
    env = bench_env(tmp_path)
    for module in ("diffusers", "open_clip", "platformdirs", "tomli_w", "ftfy"):
        proc = subprocess.run([str(device_python), "-c", f"import {module}"], capture_output=True, env=env)
        assert proc.returncode != 0, f"{module} is importable without the wheels: the isolation leaks"
    proc = subprocess.run([str(device_python), "-c", "import torch, transformers"], env=env)
    assert proc.returncode == 0


def test_the_carried_wheels_are_compiled_ahead_only_where_python_writes_no_bytecode(built_wheels, tmp_path,
                                                                                    monkeypatch):
    (wheel,) = built_wheels.glob("tomli_w-*.whl")
    for setting, compiled in (("1", True), (None, False)):
        if setting:
            monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", setting)
        else:
            monkeypatch.delenv("PYTHONDONTWRITEBYTECODE", raising=False)
        site = tmp_path / f"site-{setting}"
        install([wheel], site)
        assert (site / "tomli_w" / "_writer.py").is_file()
        assert bool(list(site.rglob("*.pyc"))) is compiled, setting


def test_device_script_end_to_end_on_cpu(built_wheels, device_python, tmp_path):
    """The runner's machinery, through bench/device.py from the wheels: the environment line, a
    variant measured, a failure contained (low-vram's, injected).  Each variant measured costs a
    child's start-up (~10 CPU-s), so one runs here: every variant's measure and ratio runs in the
    next test, under the same Python and wheels, and the variants after a failure and a hang in
    the one after it."""
    out = tmp_path / "out"
    env = bench_env(tmp_path, TISTUDIO_BENCH_FAIL="low-vram")
    proc = subprocess.run([str(device_python), "bench/device.py", str(out), "--only", "ours,low-vram",
                           *SMALL], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # the injected failure, and only it
    assert "failed: low-vram" in proc.stdout
    environment, lines = read_lines(out)

    site = environment["site"]
    assert environment["kind"] == "cpu" and environment["settings"]["steps"] == 2
    assert environment["diffusers_from"].startswith(site) and environment["open_clip_from"].startswith(site)
    assert set(environment["fit"]["carried"]) == set(wheels.CARRIED)
    assert environment["fit"]["does_not_fit"] == [] and environment["fit"]["outside_project_ranges"] == []
    assert any("importlib" in item for item in environment["fit"]["declared_not_needed"])
    assert list(lines) == ["ours", "low-vram"]  # every selected variant wrote a line, in plan order

    assert lines["low-vram"]["status"] == "error" and "failure injected" in lines["low-vram"]["error"]
    assert "Traceback" in lines["low-vram"]["output_tail"]
    assert "vs_ours" not in lines["low-vram"]
    ours = lines["ours"]
    assert ours["status"] == "ok", ours
    assert ours["device"] and ours["torch"] and ours["wall_s"] > 0 and ours["model"] == "builtin:tiny"
    assert ours["steps_per_s"] > 0 and ours["ms_per_step"] > 0 and ours["runs"] == 1
    log = next(out.glob("*.log")).read_text()
    assert "===== ours" in log and "===== low-vram" in log


# Every variant's measure, run for real by the children's own entry point (bench.measure.measure),
# in one device-like process that loads each model once instead of once per variant.
MEASURE_EACH = """
import json, sys
from bench import measure
print(json.dumps(measure.versions()), flush=True)
models = {}
for argv in json.loads(sys.argv[1]):
    args = measure.parse_args(argv)
    if args.model not in models:
        models[args.model] = measure.load(args.model)
    print(json.dumps({"variant": args.variant, **measure.measure(args, model=models[args.model])}), flush=True)
"""


def test_every_variant_measures_from_the_wheels_under_the_device_python(built_wheels, device_python, tmp_path):
    site = tmp_path / "site"
    install(sorted(built_wheels.glob("*.whl")), site)
    plan = [v for v in VARIANTS if run.spec_available(MODELS[v.model]["cpu"])]
    argvs = [[v.name, "--model", MODELS[v.model]["cpu"], *SMALL] for v in plan]
    env = bench_env(tmp_path, PYTHONPATH=os.pathsep.join([str(ROOT), str(site)]), HF_HUB_OFFLINE="1",
                    TORCH_COMPILE_DISABLE="1")
    proc = subprocess.run([str(device_python), "-c", MEASURE_EACH, json.dumps(argvs)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    found, *results = [json.loads(text) for text in proc.stdout.splitlines() if text.startswith("{")]
    assert found["diffusers_from"].startswith(str(site)) and found["open_clip_from"].startswith(str(site))
    assert [r["variant"] for r in results] == [v.name for v in plan]

    lines = {}
    for variant, result in zip(plan, results):  # each as the runner writes it, its ratio included
        line = lines[variant.name] = {**result, "status": "ok"}
        run.add_ratio(variant, line, lines.get(variant.against))
        assert line["model"] == MODELS[variant.model]["cpu"] and line["process_max_rss_gib"] > 0

    ours = lines["ours"]["steps_per_s"]
    assert ours > 0 and lines["ours"]["ms_per_step"] > 0 and lines["ours"]["runs"] == 1
    assert lines["reference"]["speedup"] == pytest.approx(ours / lines["reference"]["steps_per_s"])
    assert lines["syncs"]["note"].startswith("counted on CUDA only")
    assert lines["sync-error"]["ok"] is None and lines["sync-error"]["uploads_per_step"] == 1  # on a CPU: uploads
    scale = lines["resume-fp16"]
    assert scale["loss_scale_after_resume"] == 2.0**16 and scale["skipped_after_resume"] == 0
    assert scale["resume"]["equal"] and scale["resume_deterministic"]["equal"]  # a CPU resumes bit for bit
    assert lines["engine-fork"]["ok"] is None and "test_zygote" in lines["engine-fork"]["note"]  # CUDA's check
    assert lines["low-vram"]["low_vram"] is True
    assert lines["low-vram"]["vs_ours"] == pytest.approx(lines["low-vram"]["steps_per_s"] / ours)
    assert lines["per-layer"]["per_layer"] is True and lines["per-layer"]["steps_per_s"] > 0
    assert lines["per-layer"]["vs_ours"] == pytest.approx(lines["per-layer"]["steps_per_s"] / ours)
    assert lines["generation"]["images"] == 1 and lines["generation"]["images_per_s"] > 0
    assert lines["batched-8"]["runs"] == 8 and lines["batched-16"]["runs"] == 16
    assert lines["batched-16"]["vs_ours"] == pytest.approx(lines["batched-16"]["run_steps_per_s"] / ours)
    assert lines["table1"]["images"] == 8 and lines["table1"]["seconds"] > 0
    probes = lines["probes"]  # ours with probes and the deterministic loss at their defaults, projected
    assert probes["train_steps_per_s"] > probes["steps_per_s"] > 0 and probes["probe_images"] == 7
    assert sum(probes["share"].values()) == pytest.approx(1.0) and probes["probe_s"] > 0 and probes["dloss_ms"] > 0
    assert probes["vs_ours"] == pytest.approx(probes["steps_per_s"] / ours)
    if "sdxl" in lines:
        assert lines["sdxl"]["steps_per_s"] > 0 and lines["sdxl"]["runs"] == 1
        assert lines["sdxl-reference"]["speedup"] == pytest.approx(
            lines["sdxl"]["steps_per_s"] / lines["sdxl-reference"]["steps_per_s"])
        decode_error = lines["sdxl-decode-error"]  # an fp16 copy on a CPU: diffusers upcasts its VAE
        assert decode_error["vae_dtype_in_failed_decode"] == "torch.float32" and decode_error["vae_back_in_fp16"]
        assert decode_error["second_ok"] is True
        vae = lines["sdxl-vae-memory"]  # sizes only on a CPU: today's
        assert vae["plan"]["encode_chunk"] == 8 and vae["plan"]["free_bytes"] is None
        assert vae["ran"]["encoded_images"] == 8 and vae["ran"]["decode_batch"] == vae["plan"]["batch"]
    for name in ("compile-reduce-overhead", "compile-default"):
        assert lines[name]["compile"] == BY_NAME[name].params["mode"]
        assert lines[name]["first_warmup_s"] > 0 and lines[name]["second_warmup_s"] > 0
        assert lines[name]["compile_disabled_by_env"] is True
        assert lines[name]["reserved_released_gib"] is None  # a CUDA figure: memory_reserved after release
        assert lines[name]["vs_ours"] == pytest.approx(lines[name]["steps_per_s"] / ours)


def test_a_hung_variant_is_killed_at_its_limit_and_the_rest_go_on(tmp_path):
    out = tmp_path / "out"
    env = bench_env(tmp_path, TISTUDIO_BENCH_FAIL="ours,generation:hang,table1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "bench/run.py", "--out", str(out), "--only", "ours,generation,table1",
                           "--timeout", "3"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    _, lines = read_lines(out)
    assert lines["generation"]["status"] == "timeout" and "timed out after 3 s" in lines["generation"]["error"]
    assert lines["generation"]["injected"] == "hang"  # figures reported before the kill survive it
    assert lines["ours"]["status"] == "error" and "failure injected" in lines["ours"]["error"]
    # the variant after the hang started and ran (to its own injected failure: no 3 s spent on it)
    assert lines["table1"]["status"] == "error" and "failure injected" in lines["table1"]["error"]
    leftovers = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _cmdline_mentions(p, str(tmp_path))]
    assert leftovers == [], "a killed variant left processes behind"


def _cmdline_mentions(proc_dir: Path, text: str) -> bool:
    try:
        return text.encode() in (proc_dir / "cmdline").read_bytes()
    except OSError:
        return False


def test_a_used_up_budget_skips_the_variants_that_no_longer_fit(tmp_path):
    import time

    args = run.parse_args(["--only", "ours"])
    settings = {**run.DEFAULTS["cpu"], "budget": 100}
    line = run.run_variant(BY_NAME["ours"], "cpu", settings, args, None, {}, tmp_path, deadline=time.monotonic() + 5)
    assert line["status"] == "skipped" and "time budget spent (100 s" in line["reason"]
    assert not list(tmp_path.iterdir())  # nothing was started


# --- the pieces ------------------------------------------------------------------------------------


def test_sync_counting_counts_only_cuda_sync_warnings_and_names_their_lines():
    from bench.measure import count_syncs

    def step():
        warnings.warn("called a synchronizing CUDA operation", stacklevel=1)
        warnings.warn("called a synchronizing CUDA operation", stacklevel=1)
        warnings.warn("something else", stacklevel=1)

    modes = []
    result = count_syncs(step, 3, set_mode=modes.append)
    assert result["syncs_per_step"] == 2 and modes == ["warn", "default"]
    assert sum(result["sync_sites"].values()) == 6
    assert all(site.startswith("test_bench_device.py:") for site in result["sync_sites"])


def test_sync_counting_goes_through_our_step_and_the_reference_step(tiny_model, monkeypatch, tmp_path):
    import tempfile

    import torch

    from bench import measure

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the Bench's images and run folders
    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)  # no CUDA here: the loop, not the count
    b = measure.Bench(measure.parse_args(["syncs", "--model", "builtin:tiny", "--warmup", "1"]), model=tiny_model)
    ours, ref = measure._our_syncs(b, 2), measure._reference_syncs(b, 2)
    assert ours["syncs_per_step"] == 0 and ref["counted_steps"] == 2
    assert modes == ["warn", "default", "warn", "default"]


def _fake_dist(site: Path, name: str, requires: list[str]) -> None:
    info = site / f"{name}-1.0.dist-info"
    info.mkdir(parents=True)
    info.joinpath("METADATA").write_text("Metadata-Version: 2.1\nName: " + name + "\nVersion: 1.0\n"
                                         + "".join(f"Requires-Dist: {r}\n" for r in requires))


def test_fit_names_what_the_machine_lacks_or_has_in_the_wrong_version(tmp_path):
    from bench.device import fit

    _fake_dist(tmp_path, "fakepkg", ["numpy", "torch>=999", "no-such-package-here", 'pytest; extra == "test"',
                                     'importlib_metadata; python_version < "3.8"'])
    report = fit(tmp_path)
    assert report["carried"] == {"fakepkg": "1.0"}
    assert len(report["does_not_fit"]) == 2
    assert any("torch>=999: found" in item for item in report["does_not_fit"])
    assert any("no-such-package-here: not installed" in item for item in report["does_not_fit"])


def test_every_requirement_of_a_carried_wheel_needs_a_decision(tmp_path):
    wheel = tmp_path / "newdep-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("newdep-1.0.dist-info/METADATA", "Name: newdep\nVersion: 1.0\nRequires-Dist: torch\n"
                    "Requires-Dist: brand-new-dep>=1\nRequires-Dist: old-dep; python_version < '3.8'\n"
                    "Requires-Dist: test-dep; extra == 'test'\n\nDescription")
    assert wheels.undecided_requirements([wheel]) == ["newdep needs brand-new-dep>=1"]


def test_carried_versions_are_the_tested_ones():
    versions = wheels.pinned_versions()
    assert set(versions) == set(wheels.CARRIED)
    constraints = (ROOT / "constraints.txt").read_text().lower().replace("_", "-")
    for name, version in versions.items():
        assert f"{name}=={version}" in constraints


def test_the_plan_runs_cheap_variants_first_and_compile_last():
    names = [v.name for v in VARIANTS]
    compiles = [i for i, v in enumerate(VARIANTS) if v.measure == "compiled"]
    assert compiles == list(range(len(VARIANTS) - len(compiles), len(VARIANTS)))
    assert names[0] == "ours" and len(set(names)) == len(names)
    assert sum(v.timeout_s for v in VARIANTS if v.model == "main") > 0
    from bench.measure import MEASURES

    assert {v.measure for v in VARIANTS} <= set(MEASURES)
    assert [v.name for v in select("compile-default,ours", "ours")] == ["compile-default"]
    with pytest.raises(ValueError, match="unknown variant"):
        select("nope", None)
    assert BY_NAME["reference"].ratio == "speedup"


def test_unknown_specs_are_reported_as_unavailable():
    assert run.spec_available("builtin:tiny") and not run.spec_available("builtin:no-such-model")


def test_a_failure_is_summed_up_by_its_whole_exception_message():
    tail = ("noise before\nTraceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n    f()\n"
            "    ^^^\nPackageNotFoundError: No package metadata was found for requests\nTry: pip install it\n")
    expected = "PackageNotFoundError: No package metadata was found for requests Try: pip install it"
    assert run.exception_text(tail) == expected
    assert run.exception_text("Killed") == "Killed"
