# Set-up for a fresh clone: each target creates .venv and installs what it needs.
# constraints.txt pins torch to the CPU wheel on this machine (an unpinned torch pulls a
# multi-GB CUDA build); the package itself only asks for torch>=2.3.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $@

.PHONY: install demo test lint bench
install: $(BIN)/.installed

demo: install  ## HSplitLoRA on SmolLM2-135M (4 heterogeneous clients, E2E), scored beside the untuned model
	$(BIN)/hsplitlora train --config configs/hsplitlora.yaml --overwrite
	$(BIN)/hsplitlora evaluate runs/hsplitlora --untuned

test: install  ## the whole test suite (tiny models, a few minutes on 2 cores)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest  # two workers (pyproject), a thread each

lint: install
	$(BIN)/ruff check hsplitlora tests bench

bench: install
	$(BIN)/python bench/step_overhead.py
