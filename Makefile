# Two commands do everything on a fresh machine: `make demo` (the main job) and `make test`.
# Both create .venv on first use and install lorakit with pinned, measured-compatible versions.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lorakit-installed
# Without an NVIDIA driver, install the CPU build of torch (never the multi-GB CUDA build). On such a machine
# elsewhere, point pip at PyTorch's CPU wheel index via TORCH_PIP_ARGS; here the CPU wheel is on local disk.
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]' --config-settings editable_mode=compat
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(PY) -m lorakit run configs/default.yaml

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

bench: setup
	$(PY) bench/merge.py
	$(PY) bench/registry.py
	$(PY) bench/pipeline.py

clean:
	rm -rf $(VENV) demo-out lorakit-out .pytest_cache
