"""A non-editable wheel works outside the checkout: the ``matta`` command, the demo, both backends, the suite.

The wheel is built from a copy of the sources (``pip wheel --no-deps --no-build-isolation``: offline, with the
setuptools already installed) and installed with ``--no-deps`` into a fresh virtual environment that sees this
environment's packages (numpy, torch, Keras, pytest, ...) through a ``.pth`` line, so nothing is downloaded.
Every command runs from a directory outside the checkout with ``PYTHONPATH`` unset, so only the wheel's matta
can be imported.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: What a wheel is built from (a clean checkout holds no more than this of what installs).
SOURCES = ("pyproject.toml", "README.md", "matta", "backends", "spec_tests")

pytestmark = pytest.mark.slow


def _ignore(directory: str, names: list[str]) -> set[str]:
    # matta/backends and matta/spec_tests may be a developer's symlinks to the top-level folders; a wheel
    # is built from the folders themselves, as in a clean clone.
    skip = {n for n in names if n in ("__pycache__", "build") or n.endswith(".egg-info")}
    return skip | {n for n in names if os.path.islink(os.path.join(directory, n))}


def _run(args: list[str], cwd: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    proc = subprocess.run(args, cwd=cwd, env={**clean, **env}, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, f"{args} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict[str, str]:
    """Builds the wheel and installs it into a fresh environment; returns its paths."""
    work = tmp_path_factory.mktemp("wheel")
    src, dist, venv, outside = (str(work / n) for n in ("src", "dist", "venv", "outside"))
    os.makedirs(src)
    os.makedirs(outside)
    for name in SOURCES:
        path = os.path.join(ROOT, name)
        if os.path.isdir(path):
            shutil.copytree(path, os.path.join(src, name), ignore=_ignore)
        else:
            shutil.copy2(path, src)
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check", "--no-deps",
          "--no-build-isolation", "--no-index", "-w", dist, src], cwd=outside)
    (wheel,) = [os.path.join(dist, f) for f in os.listdir(dist) if f.endswith(".whl")]

    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=outside)
    python = os.path.join(venv, "bin", "python")
    site = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=outside).stdout.strip()
    ours = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))  # this environment's packages
    with open(os.path.join(site, "this-environments-packages.pth"), "w") as f:
        f.write("".join(f"{p}\n" for p in ours))
    # pip (from this environment, through the .pth line) installs into the fresh environment it runs in;
    # --ignore-installed: an editable matta seen through the .pth line is neither reused nor uninstalled.
    _run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps", "--no-index",
          "--ignore-installed", wheel], cwd=outside)
    return {"wheel": wheel, "venv": venv, "python": python, "site": site, "outside": outside}


def test_the_wheel_holds_the_demo_the_backends_and_the_suite(installed):
    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    for path in ("matta/__main__.py", "matta/demo/cli.py", "matta/backends/numpy/__init__.py",
                 "matta/backends/torch/__init__.py", "matta/backends/keras/__init__.py", "matta/spec_tests/conftest.py",
                 "matta/spec_tests/plugin.py", "matta/spec_tests/test_backend_conformance.py"):
        assert path in names, path
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    text = zipfile.ZipFile(installed["wheel"]).read(entry_points).decode()
    assert "[pytest11]" in text and "matta.spec_tests.plugin" in text, text


def test_the_installed_matta_is_the_wheels_and_runs_both_backends(installed):
    code = (
        "import json, numpy as np, matta, matta.demo, matta.spec_tests\n"
        "from matta import MLP, MatTA\n"
        "x = np.ones((2, 3), 'float32')\n"
        "out = {b: MatTA(MLP(d_in=3, hidden=[4], d_out=2), backend=b).extract(0.5).predict(x).tolist()\n"
        "       for b in ('torch', 'keras')}\n"
        "print(json.dumps({'files': [m.__file__ for m in (matta, matta.demo, matta.spec_tests)], 'out': out}))\n"
    )
    proc = _run([installed["python"], "-c", code], cwd=installed["outside"], KERAS_BACKEND="torch")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert all(f.startswith(installed["site"]) for f in result["files"]), result["files"]
    assert sorted(result["out"]) == ["keras", "torch"]
    assert all(len(v) == 2 and len(v[0]) == 2 for v in result["out"].values()), result


def test_the_matta_command_and_the_demo_run(installed, tmp_path):
    help_text = _run([os.path.join(installed["venv"], "bin", "matta"), "--help"], cwd=installed["outside"]).stdout
    assert "demo" in help_text, help_text
    out = tmp_path / "report"
    _run([installed["python"], "-m", "matta", "demo", "--smoke", "--no-progress", "--out", str(out),
          "--cache", str(tmp_path / "cache")], cwd=installed["outside"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics, "empty metrics.json"
    assert (out / "pareto.png").stat().st_size > 0


def test_the_conformance_suite_runs_from_the_installed_wheel(installed):
    proc = _run([installed["python"], "-m", "pytest", "-v", "-p", "no:cacheprovider", "--pyargs", "matta.spec_tests",
                 "--backends=numpy"], cwd=installed["outside"], MATTA_HYPOTHESIS_PROFILE="smoke")
    summary = proc.stdout.strip().splitlines()[-1]
    assert "passed" in summary and not any(w in summary for w in ("failed", "error", "skipped")), summary
    # --backends reached the suite (the installed one: this environment imports only the wheel's matta, see above).
    ran = [line for line in proc.stdout.splitlines() if " PASSED" in line]
    assert any("[numpy" in line for line in ran), proc.stdout[-2000:]
