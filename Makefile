# Two commands a newcomer needs: `make demo` and `make test`. Both set up .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_CONSTRAINT := $(VENV)/torch-constraint.txt

.PHONY: setup test demo demo-emoji lint clean-demo

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first: the CPU wheel here, or whatever build is already installed on a GPU machine
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/python -c "import torch; print('torch==' + torch.__version__)" > $(TORCH_CONSTRAINT)
	# everything else under a constraint that keeps that torch (no CUDA wheels pulled in)
	$(BIN)/pip install -q -c $(TORCH_CONSTRAINT) -r requirements.txt -r requirements-dev.txt
	$(BIN)/pip install -q -c $(TORCH_CONSTRAINT) --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=25 tests

# both write under demo_out/ only; maintainers add --publish (selected_images/ + README tables): make demo ARGS=--publish
demo: $(STAMP)
	$(BIN)/python -m mmdit demo $(ARGS)

demo-emoji: $(STAMP)
	$(BIN)/python -m mmdit demo --data emoji $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src data tests bench infer.py
