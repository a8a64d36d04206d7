# Each target does its own set-up: it creates (or reuses) .venv with exactly the versions in
# requirements.lock (hash-checked) and the project installed, then runs. The stamp covers both
# pyproject.toml and the lock, so a change to either reinstalls.
PY ?= python3
VENV ?= .venv
LOCK ?= requirements.lock
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml $(LOCK) | cksum | cut -d' ' -f1)

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q --require-hashes -r $(LOCK)
	$(BIN)/pip install -q --no-deps -e .
	$(BIN)/pip check
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

demo: $(STAMP)
	test -f data/shapes/train/_SUCCESS || \
	  $(BIN)/maskclip data synth --out data/shapes --rows 6000 --val-rows 512 --overwrite
	$(BIN)/maskclip run jobs/quickstart.yaml

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest -q --durations=15

bench: $(STAMP)
	$(BIN)/python benchmarks/step.py
	$(BIN)/python benchmarks/pipeline.py

clean:
	rm -rf $(VENV) runs mlruns data .pytest_cache
