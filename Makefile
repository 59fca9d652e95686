# fmtransfer: the front door. Every target creates/updates the virtualenv (.venv) itself when it is missing or
# older than pyproject.toml, and skips that step (in well under a second) when it is current.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fmtransfer-installed
# This project's machines install torch from local disk; any recent torch works elsewhere.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
ARGS ?=
PYTEST_ARGS ?=

.PHONY: help venv train compare predict export bench bench-scale gpu-report analyze notebook test lint format clean-cache clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | column -t -s $$'\t'

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "[venv] installing into $(VENV) (a few minutes the first time)"
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch, torchvision" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)  ## create/update the virtualenv

train: $(STAMP)  ## train a head on cached feature maps (default: embedded digits, offline); ARGS="experiment=hymenoptera head=multilayer"
	$(PY) -m fmtransfer.cli.train $(ARGS)

compare: $(STAMP)  ## frozen vs partial vs finetune vs scratch over seeds and shots -> report; ARGS="experiment=hymenoptera"
	$(PY) -m fmtransfer.cli.compare $(ARGS)

predict: $(STAMP)  ## classify images with a finished run -> predictions.csv; ARGS="run=<run dir> data.path=<images>"
	$(PY) -m fmtransfer.cli.predict $(ARGS)

export: $(STAMP)  ## a finished run as model.onnx + model.pt2, labels.json, preprocessing.json; ARGS="run=<run dir>"
	$(PY) -m fmtransfer.cli.export $(ARGS)

bench: $(STAMP)  ## cache vs no-cache speed, side by side -> bench.json (see docs/benchmarks.md); ARGS="trainer=gpu ..."
	$(PY) -m fmtransfer.cli.bench $(ARGS)

bench-scale: $(STAMP)  ## 100k and 200k synthetic images through make train + a 3-fold compare: RSS, disk, time (not a test); ARGS="--sizes 20000"
	$(PY) -m fmtransfer.bench.scale $(ARGS)

STAGE ?= plan
FILE ?=
DEVICE_STAGES := bench hymenoptera uiuc_texture pneumoniamnist all
# Device stages run on the lent GPU machine, whose Python already has torch: no virtualenv there.
gpu-report: $(if $(filter $(STAGE),$(DEVICE_STAGES)),,$(STAMP))  ## GPU report kit: STAGE=plan|pack|rehearse|unpack FILE=<archive> here; device stages via STAGE=plan
ifneq ($(filter $(STAGE),$(DEVICE_STAGES)),)
	bash scripts/gpu-stage $(STAGE)
else
	$(PY) -m fmtransfer.cli.gpu_report $(STAGE) $(if $(FILE),--file $(FILE)) $(if $(DATASETS),--datasets $(DATASETS))
endif

analyze: $(STAMP)  ## figures + analysis.md of the cache make train built (same ARGS as make train)
	$(PY) -m fmtransfer.cli.analyze $(ARGS)

notebook: $(STAMP)  ## execute notebooks/feature_maps.ipynb headless on that cache -> logs/notebook/<time>/ (.ipynb, .html)
	$(PY) -m fmtransfer.cli.notebook $(ARGS)

test: $(STAMP)  ## run the test suite (offline, CPU)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)  ## ruff
	$(PY) -m ruff check src tests notebooks

format: $(STAMP)  ## ruff format + import sorting
	$(PY) -m ruff check --fix src tests notebooks

clean-cache:  ## delete cached feature maps (rebuilt on the next run)
	rm -rf data/cache

clean:  ## delete caches, logs and the virtualenv
	rm -rf data/cache data/hf logs $(VENV)
