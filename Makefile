# The two commands of the README:   make demo   |   make test
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat requirements.txt constraints.txt | sha1sum | cut -c1-12)

.PHONY: setup etcd test demo bench clean

# Idempotent: re-runs only when requirements change. torch first, from the exact pin, so nothing
# resolves a newer (CUDA) build; every later install is held to constraints.txt.
$(STAMP): requirements.txt constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -r requirements.txt
	@rm -f $(VENV)/.installed-*; touch $@

setup: $(STAMP)

# etcd 3.4 from Debian for the real etcd-v2 rendezvous tests (installed when missing and root).
etcd:
	@command -v etcd >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q etcd-server; \
	  else echo "etcd not found: sudo apt-get install etcd-server (the etcd tests skip without it)"; fi; }

test: setup etcd
	$(PY) -m pytest -q

demo: setup
	$(PY) -m trainer.demo $(DEMO_ARGS)

bench: setup
	$(PY) bench/run.py $(BENCH_ARGS)

clean:
	rm -rf demo-output bench/work .pytest_cache
