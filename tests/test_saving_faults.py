"""Faults during a save (rule E6): a kill, a failing step or a full disk leave the old or the new complete save."""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import matta
from matta import MLP, saving
from matta.weights import initial_weights

SPEC = MLP(d_in=32, hidden=[256, 128], d_out=10)
OLD, NEW = initial_weights(SPEC, 0), initial_weights(SPEC, 1)


def which(target):
    """``"old"`` or ``"new"``: the complete save the target holds (any damage raises)."""
    spec, weights, _ = saving.read(target)
    assert spec == SPEC
    for label, expected in (("old", OLD), ("new", NEW)):
        if all(np.array_equal(weights[k], expected[k]) for k in expected):
            return label
    raise AssertionError("the target holds neither the old nor the new weights")


def leftovers(parent):
    return [n for n in os.listdir(parent) if ".matta-" in n]


class FailAt:
    """Raises OSError at the k-th call of os.write, os.fsync or os.rename (every step a save takes)."""

    def __init__(self, monkeypatch, k):
        self.k, self.calls = k, 0
        for name in ("write", "fsync", "rename"):
            real = getattr(os, name)
            monkeypatch.setattr(os, name, self._wrap(real))

    def _wrap(self, real):
        def call(*args, **kwargs):
            self.calls += 1
            if self.calls == self.k:
                raise OSError(errno.EIO, "injected failure")
            return real(*args, **kwargs)
        return call


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "rename-aside"])
def test_a_save_failing_at_any_step_leaves_the_old_or_the_new_save(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(saving, "_exchange", lambda a, b: False)
    target = str(tmp_path / "s")
    outcomes = set()
    for k in range(1, 200):
        saving.write(target, SPEC, OLD)
        with monkeypatch.context() as m:
            injected = FailAt(m, k)
            try:
                saving.write(target, SPEC, NEW)
                failed = False
            except matta.SaveError as exc:
                failed = True
                assert exc.errno == errno.EIO and "previous save there is unchanged" in str(exc)
        outcomes.add((failed, which(target)))
        assert not leftovers(tmp_path), leftovers(tmp_path)
        if injected.calls < k:  # this save ran every step without reaching the k-th: all covered
            break
    else:
        raise AssertionError("a save takes more than 200 steps")
    assert (True, "old") in outcomes and (False, "new") in outcomes, outcomes


def test_a_full_disk_leaves_the_previous_save_and_raises_a_save_error(tmp_path, monkeypatch):
    target = str(tmp_path / "s")
    saving.write(target, SPEC, OLD)
    written = [0]
    real_write = os.write

    def write(fd, data):
        if written[0] + len(data) > 50_000:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written[0] += len(data)
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    with pytest.raises(matta.SaveError, match="No space left on device.*previous save there is unchanged") as info:
        saving.write(target, SPEC, NEW)
    assert info.value.errno == errno.ENOSPC and isinstance(info.value, OSError)
    monkeypatch.undo()
    assert which(target) == "old" and not leftovers(tmp_path)


SAVER = """
import sys
from matta import MLP, saving
from matta.weights import initial_weights
spec = MLP(d_in=32, hidden=[256, 128], d_out=10)
weights = [initial_weights(spec, 0), initial_weights(spec, 1)]
print("ready", flush=True)
i = 0
while True:
    saving.write(sys.argv[1], spec, weights[i % 2])
    i += 1
"""


def test_a_save_killed_at_random_moments_leaves_a_complete_save(tmp_path):
    """SIGKILL a process that saves over one target again and again; the target is always a complete save."""
    target = str(tmp_path / "s")
    saving.write(target, SPEC, OLD)
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(matta.__file__))}
    rng = random.Random(0)
    seen = set()
    for _ in range(6):
        proc = subprocess.Popen([sys.executable, "-c", SAVER, target], stdout=subprocess.PIPE, env=env)
        assert proc.stdout.readline() == b"ready\n"
        time.sleep(rng.uniform(0.01, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        seen.add(which(target))
    # The next save removes what the killed processes left beside the target.
    saving.write(target, SPEC, NEW)
    assert which(target) == "new" and not leftovers(tmp_path), leftovers(tmp_path)
