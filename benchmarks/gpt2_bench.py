"""GPT-2 checkpoints: read, extract a Student and write, against transformers' own load and save.

A GPT-2-Medium-sized checkpoint (random weights, tied, ~355M parameters; ``--smoke``: a
tiny one) is written once with ``save_pretrained``. Then, each in a fresh process:

* matta: ``read_gpt2`` + ``extract`` of the quarter-``d_ff`` Student + ``write_gpt2``;
* transformers: ``AutoModelForCausalLM.from_pretrained`` + ``save_pretrained`` of the same checkpoint.

Reported: wall time of each side and their ratio (goal <= 1.0), and each side's peak RSS
above its own baseline after imports, as a multiple of the checkpoint's size (goal for
matta <= 1.2). Peak RSS is the process's ``VmHWM``.

Usage::

    python benchmarks/gpt2_bench.py [--smoke] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

MEDIUM = dict(n_embd=1024, n_layer=24, n_head=16, vocab_size=50257, n_positions=1024)
SMOKE = dict(n_embd=64, n_layer=2, n_head=4, vocab_size=1000, n_positions=64)

_HWM = r"""
def hwm():
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork+exec (see memory_bench.py).
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/self/status")
"""

MAKE = r"""
import sys, torch
from transformers import GPT2Config, GPT2LMHeadModel
torch.manual_seed(0)
config = GPT2Config(**{config!r}, tie_word_embeddings=True)
with torch.no_grad():
    GPT2LMHeadModel(config).save_pretrained({path!r})
"""

MATTA = _HWM + r"""
import json, sys, time
sys.path.insert(0, {root!r})
from matta import extract
from matta.hf import read_gpt2, write_gpt2
base = hwm()
start = time.perf_counter()
spec, weights = read_gpt2({path!r})
sub, sub_weights = extract(weights, spec, {{"d_ff": 0.25}})
del weights
write_gpt2(sub, sub_weights, {out!r})
seconds = time.perf_counter() - start
print(json.dumps({{"seconds": seconds, "base": base, "peak": hwm(), "params": spec.num_params,
                  "student_params": sub.num_params}}))
"""

TRANSFORMERS = _HWM + r"""
import json, time
import torch
from transformers import AutoModelForCausalLM
base = hwm()
start = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained({path!r})
model.save_pretrained({out!r})
seconds = time.perf_counter() - start
print(json.dumps({{"seconds": seconds, "base": base, "peak": hwm()}}))
"""


def _child(code: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(smoke: bool) -> dict:
    """Writes the checkpoint, then times and measures each side in its own process."""
    config = SMOKE if smoke else MEDIUM
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "gpt2")
        _child(MAKE.format(config=config, path=path) + "\nprint('{}')")
        size = os.path.getsize(os.path.join(path, "model.safetensors"))
        m = _child(MATTA.format(root=ROOT, path=path, out=os.path.join(tmp, "matta-out")))
        t = _child(TRANSFORMERS.format(path=path, out=os.path.join(tmp, "transformers-out")))
    return {
        "checkpoint": "smoke" if smoke else "gpt2-medium", "params": m["params"], "student_params": m["student_params"],
        "checkpoint_bytes": size, "matta_s": m["seconds"], "transformers_s": t["seconds"],
        "time_ratio": m["seconds"] / t["seconds"],
        "matta_peak_extra_bytes": m["peak"] - m["base"], "transformers_peak_extra_bytes": t["peak"] - t["base"],
        "matta_memory_ratio": (m["peak"] - m["base"]) / size, "transformers_memory_ratio": (t["peak"] - t["base"]) / size,
    }


COLUMNS = ["checkpoint", "params", "student_params", "checkpoint_bytes", "matta_s", "transformers_s", "time_ratio",
           "matta_memory_ratio", "transformers_memory_ratio"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny checkpoint: checks the benchmark runs")
    parser.add_argument("--json", default=None, help="write the result to this JSON file")
    args = parser.parse_args(argv)
    sys.path.insert(0, ROOT)
    from benchmarks.common import table, write_json

    result = run(args.smoke)
    print("GPT-2 checkpoint: read + extract quarter-d_ff Student + write (matta) vs from_pretrained + save_pretrained "
          "(transformers); goals: time_ratio <= 1.0, matta_memory_ratio <= 1.2 (peak RSS above baseline / checkpoint)")
    print(table([result], COLUMNS))
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
