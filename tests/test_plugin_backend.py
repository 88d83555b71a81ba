"""A third party can point the conformance suite at its own backend module.

``matta.backends.numpy`` is the worked example: the suite runs against it by
*module path*, the route a backend outside matta takes. A module that does not
provide a backend is an error at collection, never a skip.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _suite(backends: str, tmp_path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MATTA_HYPOTHESIS_PROFILE": "smoke"}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "--pyargs",
         "matta.spec_tests.test_backend_conformance", f"--backends={backends}", *extra],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=1200,
    )


def test_the_suite_runs_against_a_backend_given_by_module_path(tmp_path):
    proc = _suite("matta.backends.numpy", tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:]
    summary = proc.stdout.strip().splitlines()[-1]
    assert re.search(r"\d+ passed", summary) and not re.search(r"skipped|failed|error|deselected", summary), summary
    ran = [line.split(" PASSED")[0] for line in proc.stdout.splitlines() if " PASSED" in line]
    # Every test of the file takes the backend, and ran against this one (the ids name it).
    assert ran and all("numpy" in test_id for test_id in ran), ran


def test_a_module_without_a_backend_fails_loudly(tmp_path):
    proc = _suite("json.decoder", tmp_path)  # importable, but not a matta backend
    assert proc.returncode not in (0, 5), proc.stdout[-2000:]
    assert "has no 'backend' object implementing matta.backend.Backend" in proc.stdout + proc.stderr


def test_an_unimportable_backend_is_an_error_not_a_skip(tmp_path):
    proc = _suite("no_such_package.backend", tmp_path)
    assert proc.returncode not in (0, 5)
    assert "could not be imported" in proc.stdout + proc.stderr
