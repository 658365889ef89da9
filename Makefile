# Two set-up commands, each creating (once) and reusing the virtual environment .venv:
#   make demo   runs the main job on built-in data (no download, no ../shared)
#   make test   runs the test suite
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/python -m bayes_colora.depth.demo --out runs/demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q
