# The two commands a new user needs (see README.md):
#   make demo   build the package, install it into a virtualenv, run the proxy against the
#               embedded fake Microsoft 365
#   make test   the same install with the test extras, then the test suite against that install
# Both install the built wheel, never the source tree (an editable install would hide files a
# real install lacks). `make dev` gives an editable install for working on the code.
PYTHON ?= python3
VENV ?= .venv
PYTEST_ARGS ?=
VENV_ABS = $(abspath $(VENV))
SOURCES = setup.cfg pyproject.toml MANIFEST.in README.md $(shell find proxy config systemd -type f -not -path '*/__pycache__/*')
TEST_TREE = build/test-tree

.PHONY: demo test dev bench lint dist clean

$(VENV)/.python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "xoauth2-proxy needs Python 3.11 or newer")'
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip build
	touch $@

# sdist first, then the wheel built from the sdist: a file missing from the sdist fails here.
dist/.built: $(VENV)/.python $(SOURCES)
	rm -rf dist
	$(VENV)/bin/python -m build --outdir dist . >build.log 2>&1 || { cat build.log; exit 1; }
	touch $@

$(VENV)/.installed: dist/.built
	$(VENV)/bin/python -m pip install --quiet --force-reinstall --no-deps dist/*.whl
	$(VENV)/bin/python -m pip install --quiet "$$(ls dist/*.whl)[test]"
	touch $@

dist: dist/.built

demo: $(VENV)/.installed
	$(VENV)/bin/xoauth2-proxy demo

# The tests run from a copy beside no source tree, so `import proxy` can only find the install.
test: $(VENV)/.installed
	rm -rf $(TEST_TREE) && mkdir -p $(TEST_TREE) && cp -R tests setup.cfg docs $(TEST_TREE)/
	cd $(TEST_TREE) && XOAUTH2_PROXY_TEST_INSTALLED=1 $(VENV_ABS)/bin/pytest -q -rs $(PYTEST_ARGS)

dev: $(VENV)/.python
	$(VENV)/bin/python -m pip install --quiet -e '.[test]'

bench: $(VENV)/.installed
	$(VENV)/bin/python -m bench

lint: $(VENV)/.installed
	$(VENV)/bin/python -m pip install --quiet ruff mypy
	$(VENV)/bin/ruff check proxy tests
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) build dist build.log *.egg-info .pytest_cache .mypy_cache .ruff_cache
