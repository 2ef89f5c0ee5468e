# tistudio — two commands on a fresh machine: `make run` and `make test` (lint, then the tests).
#
# Torch is installed first and pinned, so an install never pulls gigabytes by
# surprise.  On a GPU box pick your own build, e.g.
#   make install TORCH_SPEC="torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cu128"

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PY := $(VENV)/bin/python
# the studio opens on the demo world once its weights are built (demo/README.md), else on builtin:tiny
MODEL ?= $(shell test -f engine/demo_weights/unet.safetensors && echo builtin:demo || echo builtin:tiny)
STAMP := $(VENV)/.installed

.PHONY: install run lint test bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH_SPEC)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/tistudio --model $(MODEL)

# ruff's rules are in pyproject.toml ([tool.ruff]); `$(VENV)/bin/ruff check --fix .` sorts imports.
lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: $(STAMP) lint
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
