# Both targets work on a fresh machine: they build .venv themselves.
# torch is installed first with the exact spelling that takes the CPU wheel on disk;
# any other spelling pulls gigabytes of CUDA packages.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup test demo clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $@

setup: $(VENV)/.installed

test: setup
	$(BIN)/python -m pytest

demo: setup
	@echo "The demo (bundled model and data, four methods) arrives with issue #5."

clean:
	rm -rf $(VENV)
