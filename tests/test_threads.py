"""The root conftest's thread settings take effect in every framework, and ``threads(n)`` widens them.

Each check starts one fresh process with the test process's environment (what
a framework imported here reads when it starts), runs matrix products on each
framework in turn and counts the threads that did the work, from the CPU time
Linux records per thread.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.subprocess

#: Per framework: matrix products for half a second, then the threads that used over 5 % of the CPU time meanwhile.
PROBE = r"""
import json, os, sys, time

def ticks():
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[tid] = int(fields[11]) + int(fields[12])  # utime + stime
    return out

def working_threads(step):
    step()
    before, start = ticks(), time.perf_counter()
    while time.perf_counter() - start < 0.5:
        step()
    used = {tid: n - before.get(tid, 0) for tid, n in ticks().items()}
    total = sum(used.values())
    return sum(1 for n in used.values() if n > 0.05 * total)

def numpy_step():
    import numpy as np
    a = np.ones((800, 800), np.float32)
    return lambda: a @ a

def torch_step():
    import torch
    a = torch.ones(800, 800)
    return lambda: a @ a

def tensorflow_step():
    import tensorflow as tf
    a = tf.ones((800, 800))
    return lambda: tf.linalg.matmul(a, a).numpy()

def jax_step():
    import jax.numpy as jnp
    a = jnp.ones((800, 800))
    return lambda: (a @ a).block_until_ready()

print(json.dumps({name: working_threads(globals()[name + "_step"]()) for name in sys.argv[1:]}))
"""

FRAMEWORKS = ["numpy", "torch", "tensorflow", "jax"]


def _working_threads() -> dict[str, int]:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run([sys.executable, "-c", PROBE, *FRAMEWORKS], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.splitlines()[-1])


def test_every_framework_computes_on_one_thread() -> None:
    """With the root conftest's settings, one thread does all of each framework's work."""
    counts = _working_threads()
    assert counts == {name: 1 for name in FRAMEWORKS}, counts


@pytest.mark.threads(2)
def test_a_test_marked_threads_2_computes_on_two() -> None:
    """``@pytest.mark.threads(2)`` gives torch here and every framework in a subprocess two threads."""
    counts = _working_threads()
    assert all(counts[name] >= 2 for name in FRAMEWORKS), counts
    torch = sys.modules.get("torch")
    if torch is not None:  # torch's pool is the one that can be resized in a running process
        assert torch.get_num_threads() == 2
