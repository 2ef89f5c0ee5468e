# tistudio — two commands on a fresh machine: `make run` and `make test` (lint, then the tests).
#
# Torch is installed first and pinned, so an install never pulls gigabytes by
# surprise.  On a GPU box pick your own build, e.g.
#   make install TORCH_SPEC="torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cu128"

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PY := $(VENV)/bin/python
# the studio opens on the default model (builtin:demo) unless MODEL=... is given
MODEL ?=
STAMP := $(VENV)/.installed

.PHONY: install run lint test test-study bench wheels bench-device clean

# Python writes a module's .pyc when a process first imports it, so only what runs is compiled:
# torch, diffusers, transformers, open_clip and textual import 3,112 of the venv's 15,923 files
# (21 CPU-seconds once, where compiling them all took 100).  This machine sets
# PYTHONDONTWRITEBYTECODE, under which no process would ever write one, and every engine, zygote
# and CLI would compile torch's and diffusers' sources again: make's commands run without it.
unexport PYTHONDONTWRITEBYTECODE

# torch comes with pip, which takes the pinned CUDA build from this machine's disk (uv would
# download its 3 GB); the rest with uv, which installs the same constrained versions as pip in
# 8 s where pip took 44 (measured on a fresh venv).  `make install UV=pip` uses pip for both.
UV ?= uv
$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --no-compile --disable-pip-version-check $(TORCH_SPEC)
ifeq ($(UV),pip)
	$(PY) -m pip install -q --no-compile --disable-pip-version-check -c constraints.txt -e '.[test]'
else
	$(PY) -m pip install -q --no-compile --disable-pip-version-check -c constraints.txt uv
	$(VENV)/bin/uv pip install -q --python $(PY) -c constraints.txt -e '.[test]'
endif
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/tistudio $(if $(MODEL),--model $(MODEL))

# ruff's rules are in pyproject.toml ([tool.ruff]); `$(VENV)/bin/ruff check --fix .` sorts imports.
lint: $(STAMP)
	$(VENV)/bin/ruff check .

# The suite runs on every core (pytest-xdist), a test file to a worker at a time: a file's tests
# share its module-scoped engines and wheels.  TEST_WORKERS=0 runs it in this one process.
TEST_WORKERS ?= auto
test: $(STAMP) lint
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# The README's one-seed table per regulariser on the demo, measured again and checked, and the
# frontier's cell on both held-out concepts (6 to 11 CPU-minutes); `make test` checks that cell
# on mushroom alone.
test-study: $(STAMP)
	TISTUDIO_TEST_STUDY=1 $(PY) -m pytest -q tests/test_demo.py -k "regularised_inversion or frontier_cell" -rxs

# `make bench DEVICES=N`: sweep throughput through the engine on 1 and on N devices (bench/scaling.py)
bench: $(STAMP)
	$(PY) bench/run.py $(if $(DEVICES),--devices $(DEVICES)) $(BENCH_ARGS)

# A bare GPU machine (no registry, its own torch): `make wheels` here, carry .whl, then there
# `python3 bench/device.py $$OUT` (or `make bench-device`, which writes to $$OUT when it is set;
# BENCH_ARGS="--only table1" and the like pass on to bench/run.py).
wheels:
	$(PYTHON) bench/wheels.py

bench-device:
	$(PYTHON) bench/device.py $(or $(OUT),bench/results) $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
