# make demo   set up .venv and train on the bundled digits (DDP, 2 CPU processes)
# make test   set up .venv and run ruff and the whole test suite
# make bench  the benchmark suite (installs Lightning into a separate .venv-bench)

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench setup clean

$(STAMP): pyproject.toml requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements-dev.txt -e .
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/syncstep demo

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(MAKE) -C benchmarks all PYTHON=$(PYTHON)

clean:
	rm -rf $(VENV) .venv-bench syncstep_demo syncstep_logs checkpoints .pytest_cache
