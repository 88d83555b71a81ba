# The two commands (README): `make demo` runs the main job, `make test` runs everything CI checks.
# Both create or reuse the virtual environment at .venv and install matta with every extra.

VENV    := .venv
PYTHON  := $(VENV)/bin/python
STAMP   := $(VENV)/.matta-installed
# Keras writes ~/.keras unless told otherwise; keep it inside the checkout.
export KERAS_HOME := $(CURDIR)/.keras-home
export TF_CPP_MIN_LOG_LEVEL := 2
export MATTA_HYPOTHESIS_PROFILE ?= ci

.PHONY: install demo test test-core test-keras test-keras-tensorflow test-keras-jax test-keras-torch docs serve-docs diagrams clean

$(STAMP): pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -e '.[all]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/matta demo $(ARGS)

# Core + numpy reference + torch in one process.
test-core: install
	$(PYTHON) -m pytest -q -p no:cacheprovider ./tests --pyargs matta.spec_tests --backends=torch --ignore=tests/test_keras_backend.py

# The Keras backend once per engine, each in its own process (Keras reads KERAS_BACKEND once per
# process): its unit tests, the conformance suite and the Keras examples of the docs.
# Hypothesis profiles: 200 examples run on torch (test-core); each Keras engine runs the dev
# profile, and JAX, which compiles every new shape op by op, a smaller one to stay inside CI's time.
KERAS_TESTS := tests/test_keras_backend.py tests/test_docs.py::test_python_blocks_run --pyargs \
	matta.spec_tests.test_backend_conformance matta.spec_tests.test_cross_backend matta.spec_tests.test_training_and_saving \
	--backends=keras
KERAS_PROFILE ?= dev
JAX_PROFILE ?= smoke
test-keras-tensorflow: install
	KERAS_BACKEND=tensorflow MATTA_DOCS_KERAS=1 MATTA_HYPOTHESIS_PROFILE=$(KERAS_PROFILE) $(PYTHON) -m pytest -q -p no:cacheprovider $(KERAS_TESTS)
test-keras-jax: install
	KERAS_BACKEND=jax MATTA_DOCS_KERAS=1 MATTA_HYPOTHESIS_PROFILE=$(JAX_PROFILE) $(PYTHON) -m pytest -q -p no:cacheprovider $(KERAS_TESTS)
test-keras-torch: install
	KERAS_BACKEND=torch MATTA_DOCS_KERAS=1 MATTA_HYPOTHESIS_PROFILE=$(KERAS_PROFILE) $(PYTHON) -m pytest -q -p no:cacheprovider $(KERAS_TESTS)
test-keras: test-keras-tensorflow test-keras-jax test-keras-torch

# The four suites two at a time, one framework thread each (root conftest.py), so both cores work:
# the longest (JAX) starts first and the other three follow it on the second core. -k runs every suite
# even after one fails; each suite's output is printed whole when it ends; the exit code fails if any does.
SUITES := test-keras-jax test-core test-keras-tensorflow test-keras-torch
TEST_JOBS ?= 2
test: install
	$(MAKE) --no-print-directory -k -j$(TEST_JOBS) --output-sync=target $(SUITES)

# The documentation site (mkdocs-material; builds and serves offline).
docs: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

serve-docs: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve

# Redraws docs/assets/*.svg from the nesting rules (the output is committed).
diagrams: install
	$(PYTHON) docs/scripts/diagrams.py

clean:
	rm -rf $(VENV) build *.egg-info site .keras-home
