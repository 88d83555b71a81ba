"""House rule: the core never imports a deep-learning framework."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import pytest

import matta

pytestmark = pytest.mark.subprocess

FRAMEWORKS = ("torch", "tensorflow", "keras", "jax", "flax")


def test_importing_every_core_module_imports_no_framework():
    core = sorted(m.name for m in pkgutil.iter_modules(matta.__path__, "matta.") if m.name not in ("matta.backends", "matta.demo"))
    assert "matta.nesting" in core and "matta.reference" in core, core
    code = (
        "import sys, importlib\n"
        f"for name in {core!r}: importlib.import_module(name)\n"
        "import matta\n"
        f"loaded = sorted(m for m in sys.modules if m.split('.')[0] in {FRAMEWORKS!r})\n"
        "print(','.join(loaded))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"the core imported {out.stdout.strip()}"


def test_the_check_can_fail():
    """The subprocess probe does see a framework when one is imported (so the test above can fail)."""
    code = "import sys, torch\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
