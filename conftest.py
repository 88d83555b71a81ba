"""Settings every test process shares: one framework thread unless a test says otherwise.

The models under test are small, so one thread per process is the fastest
setting on a shared CPU (an oversubscribed pool spends its time waiting), and a
fixed thread count keeps BLAS reductions, and so the last bits of a result, the
same from run to run. The variables below are read once, when each framework
starts, so this file sets them at import, before any test module imports a
framework; subprocesses that tests start inherit them. ``MATTA_TEST_THREADS``
changes the count for a whole run. Each variable's effect on its framework is
checked by ``tests/test_threads.py``.

A test that needs more threads says so with ``@pytest.mark.threads(n)``
(markers are registered in pyproject.toml): torch in the test process (its pool
can be resized at any time) and every subprocess the test starts then get ``n``
threads. TensorFlow's and JAX's pools are fixed when they start, so a test that
needs them wider runs them in a subprocess.
"""

from __future__ import annotations

import os
import sys

import pytest

#: Threads per test process; the default is one.
THREADS = os.environ.get("MATTA_TEST_THREADS", "1")

#: The variable that sizes each framework's CPU thread pool, read when the framework starts.
THREAD_VARIABLES = (
    "OMP_NUM_THREADS",  # torch's intra-op pool, and OpenMP BLAS
    "OPENBLAS_NUM_THREADS",  # numpy's BLAS
    "MKL_NUM_THREADS",  # MKL, where numpy or torch link it
    "TF_NUM_INTRAOP_THREADS",  # TensorFlow's intra-op pool
    "TF_NUM_INTEROP_THREADS",  # TensorFlow's inter-op pool
    "NPROC",  # XLA's CPU client (JAX): the size of its Eigen and client pools
)


def _set_threads(environ, n: str) -> None:
    for name in THREAD_VARIABLES:
        environ[name] = n


_set_threads(os.environ, THREADS)


@pytest.fixture(autouse=True)
def _framework_threads(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    """Gives a test marked ``threads(n)`` ``n`` threads in torch and in the subprocesses it starts."""
    marker = request.node.get_closest_marker("threads")
    if marker is None:
        yield
        return
    n = int(marker.args[0])
    for name in THREAD_VARIABLES:
        monkeypatch.setenv(name, str(n))
    torch = sys.modules.get("torch")  # only a framework the process already runs; none is imported here
    before = torch.get_num_threads() if torch is not None else None
    if torch is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch is not None:
            torch.set_num_threads(before)
