# lowrank_tales: every command creates or reuses the project virtual environment .venv/ and installs what it needs.
#   make docs    build the documentation site from the notebooks and serve it on http://127.0.0.1:$(PORT) (Ctrl-C stops)
#   make test    the whole test suite (what CI runs)
#   make site    build the site only, into _docs/
#   make lab     open the notebooks in JupyterLab
#   make bench   run the benchmarks (they print tables and write benchmarks/results/*.json)
#   make export  regenerate lowrank_tales/ from nbs/;  make clean-nbs  strip notebooks as nbdev_clean does
#   make slow    run the notebooks that have `#| slow` cells with those cells included (`make test` skips them)
#   make slow-save  re-execute those notebooks, every cell, and save their outputs (then commit them)
#   make cuda    run the `#| slow` and `#| cuda` cells too (needs a CUDA GPU)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PORT ?= 8000
STAMP := $(VENV)/.installed
export LOWRANK_TALES_PROGRESS ?= 0

.PHONY: docs site test lab bench export clean-nbs venv browser clean slow slow-save cuda

venv: $(STAMP)

# torch is pinned to the local CPU build first (an unpinned torch pulls a multi-GB CUDA build);
# constraints.txt pins the rest to versions checked together.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev,data,peers]"
	touch $(STAMP)

# Debian's Chromium for the browser tests (Playwright drives it; it never downloads a browser of its own).
browser:
	@command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

site: $(STAMP)
	$(PY) tools/build_docs.py

docs: site
	@echo "Serving the book at http://127.0.0.1:$(PORT)/  (Ctrl-C stops)"
	$(PY) -m http.server $(PORT) --bind 127.0.0.1 --directory _docs

test: $(STAMP) browser
	$(PY) -m pytest tests -q

# tools/lab_contents.py: notebooks open without a 'modified' mark (the kernel's metadata filled in) and save as
# nbdev_clean leaves them.
lab: $(STAMP)
	PYTHONPATH=$(CURDIR)/tools $(VENV)/bin/jupyter lab --notebook-dir=nbs --ServerApp.ip=127.0.0.1 \
	  --ServerApp.contents_manager_class=lab_contents.BookContentsManager $(if $(filter 0,$(shell id -u)),--allow-root)

bench: $(STAMP)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev,data,peers,bench]"
	for f in benchmarks/bench_*.py; do echo "== $$f"; $(PY) $$f || exit 1; done
	$(PY) benchmarks/bench_als.py --scale  # completion at scale (CPU, a tenth of MovieLens-20M's size)

SLOW_NBS = $(shell grep -l '#| slow' nbs/*.ipynb)
CUDA_NBS = $(shell grep -l '#| cuda' nbs/*.ipynb)

slow: $(STAMP)
	for nb in $(SLOW_NBS); do echo "== $$nb"; $(VENV)/bin/nbdev_test --flags slow --path $$nb || exit 1; done

slow-save: $(STAMP)
	for nb in $(SLOW_NBS); do echo "== $$nb"; LOWRANK_TALES_PROGRESS=0 $(VENV)/bin/jupyter nbconvert --to notebook \
	  --execute --inplace $$nb \
	  && $(VENV)/bin/nbdev_clean --fname $$nb || exit 1; done

cuda: $(STAMP)
	for nb in $(sort $(SLOW_NBS) $(CUDA_NBS)); do echo "== $$nb"; $(VENV)/bin/nbdev_test --flags "slow cuda" --path $$nb || exit 1; done

export: $(STAMP)
	$(VENV)/bin/nbdev_export

clean-nbs: $(STAMP)
	$(VENV)/bin/nbdev_clean

clean:
	rm -rf _proc _docs .pytest_cache
