# Two commands on a fresh machine: `make demo` (the main job, on the bundled default model) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
OUT ?= outputs

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

test: $(STAMP)
	$(PY) -m pytest

# Re-make the bundled model from scratch (stage-0 VAE, its ShapesGenEval ceiling, the model, its scorecard):
# about an hour on 2 idle CPU cores. Results in runs/; copy runs/tiny-shapes/export to ship it.
tiny-model: $(STAMP)
	$(VENV)/bin/cheers train --recipe stage0_vae
	$(VENV)/bin/cheers eval vae-ceiling runs/shapes-vae/vae
	$(VENV)/bin/cheers train --recipe tiny-shapes
	$(VENV)/bin/cheers eval shapes --model runs/tiny-shapes/export --out runs/bench --n 20 --num-images 2 \
		--scorecard runs/tiny-shapes/export/scorecard.json

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench

.PHONY: install demo test lint tiny-model
