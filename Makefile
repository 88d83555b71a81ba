# The two commands (README): `make demo` runs the main job, `make test` runs everything CI checks.
# Both create or reuse the virtual environment at .venv and install matta with every extra.

VENV    := .venv
PYTHON  := $(VENV)/bin/python
STAMP   := $(VENV)/.matta-installed
# Keras writes ~/.keras unless told otherwise; keep it inside the checkout.
export KERAS_HOME := $(CURDIR)/.keras-home
export TF_CPP_MIN_LOG_LEVEL := 2
export MATTA_HYPOTHESIS_PROFILE ?= ci

.PHONY: install demo test test-core docs serve-docs diagrams test-docs-keras clean

$(STAMP): pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -e '.[all]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/matta demo $(ARGS)

# Core + numpy reference + torch in one process.
test-core: install
	$(PYTHON) -m pytest -q -p no:cacheprovider tests spec_tests --backends=torch

test: install test-core

# The documentation site (mkdocs-material; builds and serves offline).
docs: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

serve-docs: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve

# Redraws docs/assets/*.svg from the nesting rules (the output is committed).
diagrams: install
	$(PYTHON) docs/scripts/diagrams.py

# The Keras examples of the docs, once per Keras engine (tests/test_docs.py, MATTA_DOCS_KERAS=1).
KERAS_ENGINES ?= tensorflow jax torch
test-docs-keras: install
	set -e; for engine in $(KERAS_ENGINES); do \
	  MATTA_DOCS_KERAS=1 KERAS_BACKEND=$$engine $(PYTHON) -m pytest -q -p no:cacheprovider tests/test_docs.py -k test_python_blocks_run; \
	done

clean:
	rm -rf $(VENV) build *.egg-info site .keras-home
