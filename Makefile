# Two commands on a fresh machine: `make demo` (the main job, on the bundled default model) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
OUT ?= outputs
TRAIN_ARGS ?=

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU build of torch first, so the package's torch range does not pull a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,train,eval,demo]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/cheers generate "two red circles" --out $(OUT)/two-red-circles.png
	$(VENV)/bin/cheers ask $(OUT)/two-red-circles.png "How many circles are there?"

# the full suite, after the lint and format checks (CI runs this)
test: lint
	$(PY) -m pytest

# the fast tier (about a minute): everything not marked slow
test-fast: lint
	$(PY) -m pytest -m "not slow"

# Re-make the bundled model from scratch (stage-0 VAE, its ShapesGenEval ceiling, the model, its
# understanding-heavy continuation, its scorecard): the bundled one took 11 minutes on one H100 (with
# TRAIN_ARGS="--set data.num_workers=14") for the first two runs and 70 minutes on 2 CPU cores for the third;
# the first two take about a day on 2 CPU cores (TRAIN_ARGS="--set train.minutes=M" fits each run to M
# minutes instead). Results in runs/; copy runs/tiny-shapes-und/export to ship it.
tiny-model: $(STAMP)
	$(VENV)/bin/cheers train --recipe stage0_vae $(TRAIN_ARGS)
	$(VENV)/bin/cheers eval vae-ceiling runs/shapes-vae/vae
	$(VENV)/bin/cheers train --recipe tiny-shapes $(TRAIN_ARGS)
	$(VENV)/bin/cheers train --recipe tiny-shapes-und $(TRAIN_ARGS)
	cp src/cheers/assets/cheers-tiny-shapes/sampling_defaults.json runs/tiny-shapes-und/export/
	$(VENV)/bin/cheers eval shapes --model runs/tiny-shapes-und/export --out runs/bench --n 20 --num-images 1 \
		--scorecard runs/tiny-shapes-und/export/scorecard.json

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

.PHONY: install demo test test-fast lint tiny-model
