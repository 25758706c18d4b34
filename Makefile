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

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench

.PHONY: install demo test lint
