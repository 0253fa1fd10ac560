# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU wheel of torch; an unpinned torch pulls a multi-GB CUDA build on CPU-only machines.
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: install test test-all lint demo bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test,viz,video,lmms]" "$(TORCH_SPEC)"
	@# lmms-eval pulls PyPI's torchvision, a CUDA build that cannot load beside the CPU torch wheel (and transformers
	@# imports torchvision whenever it is installed): on a torch without CUDA, remove it.
	$(PY) -c "import sys, torch; sys.exit(torch.version.cuda is not None)" && $(PY) -m pip uninstall -q -y torchvision || true
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" --durations=25 tests

test-all: $(STAMP)  # also the slow tests: every script with every method, the demo
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check llava pio tests

demo: $(STAMP)
	bash scripts/demo.sh

bench: $(STAMP)
	$(PY) -m llava.eval.bench --shape llava-v1.5-7b --dtype bfloat16 --methods pio,fastv,pdrop,sparsevlm,dart,random --budget 64

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
