# Verbs of the project. `make final` sets everything up on first use (virtualenv, packages,
# offline data and weights when ../shared exists) and trains the default model.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SHARED ?= ../shared
KERAS_MODELS ?= $(HOME)/.keras/models

# Offline mode: when ../shared holds the data, build cache/cifar10.npz from it and use it.
ifneq ($(wildcard $(SHARED)/data/make_cifar10_npz.py),)
CIFAR10_NPZ ?= $(CURDIR)/cache/cifar10.npz
OFFLINE := offline
endif
export CIFAR10_NPZ
export TF_CPP_MIN_LOG_LEVEL ?= 2

ENGINE ?= optuna
PHASE ?= both
TRIALS ?=
TAIL_TRIALS ?=
WORKERS ?= 1
PRUNER ?=
ORACLE ?=
STORAGE ?=
STUDY ?=
ARGS ?=
# your own images: DATA=path/to/folder (DIR/<class>/*.jpg or DIR/train|test/<class>/), IMAGE_SIZE=stored side
DATA ?=
IMAGE_SIZE ?=
DATA_ARGS := $(if $(DATA),--data $(DATA),) $(if $(IMAGE_SIZE),--image-size $(IMAGE_SIZE),)
# only what is set is passed: an engine refuses options it cannot honour (e.g. PRUNER with kerastuner)
SEARCH_ARGS := $(if $(TRIALS),--trials $(TRIALS),) $(if $(TAIL_TRIALS),--tail-trials $(TAIL_TRIALS),) \
  $(if $(PRUNER),--pruner $(PRUNER),) $(if $(ORACLE),--oracle $(ORACLE),) \
  $(if $(STORAGE),--storage $(STORAGE),) $(if $(STUDY),--study-name $(STUDY),)

.PHONY: help setup offline final search search-effect readme report paper evaluate test lint bench bench-cache bench-search bench-tail bench-memory reliability \
  clean-cache dashboard

help:  ## list the verbs
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

setup: $(VENV)/.installed $(OFFLINE)  ## virtualenv + packages (+ offline data/weights)

offline: $(VENV)/.installed  ## build cache/cifar10.npz and seed ImageNet weights from ../shared
	@test -f $(CIFAR10_NPZ) || $(PY) $(SHARED)/data/make_cifar10_npz.py $(CIFAR10_NPZ)
	@mkdir -p $(KERAS_MODELS)
	@for f in $(SHARED)/keras-cache/models/*.h5; do \
	  test -f $(KERAS_MODELS)/$$(basename $$f) || cp $$f $(KERAS_MODELS)/; done

final: setup  ## train both phases' best parameters (this cache key's searches) on the cache, save ./cifar10.h5
	$(VENV)/bin/transfer-search final $(DATA_ARGS) $(ARGS)

search: setup  ## both phases on the cache (PHASE=head|tail|both, ENGINE, TRIALS, TAIL_TRIALS, WORKERS, STORAGE, PRUNER, ORACLE)
	$(VENV)/bin/transfer-search search $(DATA_ARGS) --engine $(ENGINE) --phase $(PHASE) --workers $(WORKERS) $(SEARCH_ARGS) $(ARGS)

report: setup  ## HTML report of the latest phase-1 study (+ final model) -> results/report/ (PHASE=tail for phase 2)
	$(VENV)/bin/transfer-search report $(if $(filter tail,$(PHASE)),--phase tail --out results/report-tail,)

paper: setup  ## docs/paper.md + docs/paper.html from results/ (after search, final, report, bench)
	$(VENV)/bin/transfer-search paper

evaluate: setup  ## the classic evaluation script, unmodified, on ./cifar10.h5
	$(VENV)/bin/transfer-search evaluate

bench: bench-cache bench-search  ## both benchmarks

bench-cache: setup  ## extraction vs raw predict, CPU seconds, BFC vs glibc allocator -> results/bench_cache.json
	$(VENV)/bin/transfer-search bench-cache $(ARGS)

bench-search: setup  ## phase-1/phase-2 trial seconds, fidelity Kendall tau, end-to-end epoch -> results/bench_search.json
	$(VENV)/bin/transfer-search bench-search $(ARGS)

bench-tail: setup  ## phase-2 fidelity: tail configurations at trial budgets vs 20000x5, Kendall tau -> results/bench_search.json (ARGS="--budgets 4000x2,2000x3")
	$(VENV)/bin/transfer-search bench-tail $(ARGS)

bench-memory: setup  ## resident memory over a 200-trial phase-1 search (and a baseline) -> results/bench_memory.json
	$(VENV)/bin/transfer-search bench-memory $(ARGS)

search-effect: setup  ## search+final vs final --params default on lowdata and digits, seeds 0 and 1 -> results/search_effect.json
	$(VENV)/bin/transfer-search effect $(ARGS)

readme: setup  ## regenerate README.md's results table from results/
	$(VENV)/bin/transfer-search results-table

TEST_WORKERS ?= 2
test: setup  ## the test suite (tiny data, tiny backbones; under 8 min) in TEST_WORKERS processes, a file per process
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

RELIABILITY_TESTS := tests/test_reliability.py tests/test_cache.py tests/test_cli.py tests/test_preprocess.py \
  tests/test_search.py tests/test_workers.py tests/test_postgres_workers.py tests/test_postgres_kill.py tests/test_postgres_restart.py tests/test_final.py tests/test_train.py tests/test_images.py tests/test_backbones.py

reliability: setup  ## fault-injection and bad-input suite -> results/reliability.json
	mkdir -p results
	-$(PY) -m pytest -q -m "slow or not slow" $(RELIABILITY_TESTS) --junitxml=results/reliability.xml
	$(PY) tests/reliability_report.py results/reliability.xml results/reliability.json

lint: setup  ## ruff
	$(VENV)/bin/ruff check .

dashboard: setup  ## open the study in optuna-dashboard (pip install optuna-dashboard)
	$(VENV)/bin/optuna-dashboard $(or $(STORAGE),sqlite:///results/study.db)

clean-cache:  ## delete feature caches (keeps cache/cifar10.npz)
	find cache -mindepth 1 -maxdepth 1 -type d -exec rm -rf {} +
