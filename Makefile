# fedbayes: the README's two commands are `make demo` and `make test`; both set everything up (idempotent).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
FEDBAYES := $(VENV)/bin/fedbayes
STAMP := $(VENV)/.installed
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup data test demo lint docs bench gpu-check compose-check compose-purge clean

$(PY):
	python3 -m venv $(VENV)

# torch first (the CPU wheel; a bare `torch` would pull a multi-GB CUDA build), then the project + dev extras.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --disable-pip-version-check -q "$(TORCH_SPEC)"
	$(PY) -m pip install --disable-pip-version-check -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

data: setup
	$(FEDBAYES) data fetch all

test: setup data
	@set +e; $(PY) -m pytest; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests: failing" >&2; exit 1; fi; exit $$rc

# two runs at a time, one torch thread each (faster than one run with two threads on a 2-core machine); --force:
# runs/demo is the demo's own folder, so a demo whose preset changed since the last `make demo` reruns (finished
# runs with the same settings are reused) instead of refusing the folder
demo: setup data
	FEDBAYES_THREADS=1 OMP_NUM_THREADS=1 $(FEDBAYES) compare --preset demo --jobs 2 --force --out runs/demo

lint: setup
	$(VENV)/bin/ruff check fedbayes server client simulations tests examples
	$(VENV)/bin/mypy

# the documentation site (MkDocs, strict: a broken link or docstring reference fails), into build/site
docs: setup
	$(VENV)/bin/mkdocs build --strict -q

bench: setup data
	$(FEDBAYES) bench ivon --out runs/bench

# One go on a machine with a CUDA GPU: 2 rounds of bayes-admm in-process on cuda, then Flower simulation with
# a GPU fraction per ClientApp; prints device, timings and accuracy (fails clearly without a GPU).
gpu-check: setup data
	$(PY) -m simulations.gpu_check

# The docker-compose federation for real, on this one host, offline (as root): installs docker.io, debootstrap and
# the Compose v2 plugin (sha256-pinned) when missing, runs a private dockerd (host networking only, no bridge, no
# iptables) from /var/tmp/fedbayes-compose, builds the images, runs 2 rounds insecure, with TLS and with TLS +
# SuperNode auth, checks the results volume, tears everything down by PID and prints the timings. A second run
# reuses the base image and the build cache; compose-purge deletes them (simulations/compose_check.py).
compose-check: setup
	$(PY) -m simulations.compose_check

compose-purge:
	$(PY) -m simulations.compose_check --purge

clean:
	rm -rf $(VENV) runs build .pytest_cache .mypy_cache .ruff_cache *.egg-info
