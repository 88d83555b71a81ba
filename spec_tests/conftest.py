"""Conformance-suite plumbing: the ``backend`` fixture and Hypothesis profiles.

Run the suite against any backend, from any directory (the ``--backends`` option
comes from :mod:`matta.spec_tests.plugin`)::

    python -m pytest --pyargs matta.spec_tests --backends=torch
    KERAS_BACKEND=jax python -m pytest --pyargs matta.spec_tests --backends=keras
    python -m pytest --pyargs matta.spec_tests --backends=my_package.my_backend   # a third-party module

A requested backend that fails to import is an error, never a skip.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, Phase, settings

_COMMON = dict(
    deadline=None,
    print_blob=True,  # a failing example prints a @reproduce_failure blob
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
# dev, ci and smoke are derandomized (examples drawn from a hash of each test), so a run of `make test`
# is reproducible and a red CI run is a real finding, not a new draw; `thorough` explores new random
# examples on every run.
settings.register_profile("dev", max_examples=25, derandomize=True, **_COMMON)
settings.register_profile("ci", max_examples=200, derandomize=True, **_COMMON)
settings.register_profile("thorough", max_examples=2000, **_COMMON)
settings.register_profile("smoke", max_examples=5, phases=[Phase.generate], derandomize=True, **_COMMON)
settings.load_profile(os.environ.get("MATTA_HYPOTHESIS_PROFILE", "dev"))


def requested_backends(config: pytest.Config) -> list[str]:
    names = [n.strip() for n in config.getoption("--backends").split(",") if n.strip()]
    assert names, "--backends must name at least one backend"
    return names


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" in metafunc.fixturenames:
        from matta.backend import get_backend

        # get_backend raises BackendError if the framework is missing: collection fails loudly.
        backends = [get_backend(name) for name in requested_backends(metafunc.config)]
        ids = [_backend_id(b) for b in backends]
        metafunc.parametrize("backend", backends, ids=ids)


def _backend_id(backend) -> str:
    engine = backend.engine()
    return backend.name if engine == backend.name else f"{backend.name}-{engine}"
