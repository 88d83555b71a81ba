"""The suite's pytest plugin: the ``--backends`` option.

pytest reads options before it collects any ``conftest.py``, and with
``--pyargs matta.spec_tests`` from another directory the package's conftest is
not among the ones it reads first; so the option lives here, registered by the
``pytest11`` entry point of an installed matta (and by ``-p`` in a checkout's
pytest settings). The rest of the plumbing is in ``conftest.py``.
"""

from __future__ import annotations

import os

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("matta", "matta conformance suite")
    group.addoption(
        "--backends",
        default=os.environ.get("MATTA_BACKENDS", "torch"),
        help="comma-separated backends for matta.spec_tests: numpy, torch, keras (engine from KERAS_BACKEND), "
        "or a module path with a `backend` object",
    )
