# The two commands a new user needs (see README.md):
#   make demo   set up a virtualenv, then run the proxy against the embedded fake Microsoft 365
#   make test   set up a virtualenv with the test extras, then run the test suite
PYTHON ?= python3
VENV ?= .venv
PYTEST_ARGS ?=

.PHONY: demo test bench lint clean

$(VENV)/.installed: setup.cfg pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "xoauth2-proxy needs Python 3.11 or newer")'
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/xoauth2-proxy demo

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

bench: $(VENV)/.installed
	$(VENV)/bin/python -m bench

lint: $(VENV)/.installed
	$(VENV)/bin/python -m pip install --quiet ruff mypy
	$(VENV)/bin/ruff check proxy tests
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
