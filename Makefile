# The two commands (README): `make demo` runs the main job, `make test` runs everything CI checks.
# Both create or reuse the virtual environment at .venv and install matta with every extra.

VENV    := .venv
PYTHON  := $(VENV)/bin/python
STAMP   := $(VENV)/.matta-installed
# Keras writes ~/.keras unless told otherwise; keep it inside the checkout.
export KERAS_HOME := $(CURDIR)/.keras-home
export TF_CPP_MIN_LOG_LEVEL := 2
export MATTA_HYPOTHESIS_PROFILE ?= ci

.PHONY: install demo test test-core test-keras test-keras-tensorflow test-keras-jax test-keras-torch docs serve-docs clean

$(STAMP): pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -e '.[all]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/matta demo $(ARGS)

# Core + numpy reference + torch in one process.
test-core: install
	$(PYTHON) -m pytest -q -p no:cacheprovider tests spec_tests --backends=torch --ignore=tests/test_keras_backend.py

# The Keras backend once per engine, each in its own process (Keras reads KERAS_BACKEND once per process).
KERAS_TESTS := tests/test_keras_backend.py spec_tests --backends=keras
test-keras-tensorflow: install
	KERAS_BACKEND=tensorflow $(PYTHON) -m pytest -q -p no:cacheprovider $(KERAS_TESTS)
test-keras-jax: install
	KERAS_BACKEND=jax $(PYTHON) -m pytest -q -p no:cacheprovider $(KERAS_TESTS)
test-keras-torch: install
	KERAS_BACKEND=torch $(PYTHON) -m pytest -q -p no:cacheprovider $(KERAS_TESTS)
test-keras: test-keras-tensorflow test-keras-jax test-keras-torch

test: install test-core test-keras

clean:
	rm -rf $(VENV) build *.egg-info site .keras-home
