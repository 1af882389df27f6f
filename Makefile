# Two commands on a fresh machine: `make run` (build the demo model, shard, calibrate, serve)
# and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_PIN := torch==2.13.0
DATA ?= .taer
HOST ?= 127.0.0.1
PORT ?= 8000
KEEP ?= 0.5

.PHONY: install test lint run demo bench clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch; an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e '.[dev,bench]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

demo: $(STAMP)
	$(BIN)/taer demo build --out $(DATA)/demo

run: $(STAMP)
	$(BIN)/taer quickstart --data $(DATA) --keep $(KEEP) --host $(HOST) --port $(PORT)

# The peer server the benchmark compares against (transformers serve) is installed for it alone.
$(VENV)/.peer-installed: $(STAMP)
	$(BIN)/pip install -q -e '.[serving-peer]'
	touch $@

bench: $(VENV)/.peer-installed
	$(BIN)/taer bench all --out bench-results

clean:
	rm -rf $(VENV) $(DATA) bench-results .pytest_cache
