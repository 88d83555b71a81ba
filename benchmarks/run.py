"""matta benchmarks: training and serving cost as ratios against plain models.

Usage::

    python benchmarks/run.py [--smoke] [--json PATH] [--backends torch,keras-tensorflow,keras-jax,keras-torch] [--distributed]

Every figure is a ratio of two timings taken side by side, round-robin, in
one run (the machines are noisy); absolute seconds are printed beside them
with the machine they came from.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # so "benchmarks.*" imports from a checkout

from benchmarks.common import SERVING_ROUNDS, machine, table, workloads, write_json  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and one repeat: checks the benchmark runs")
    parser.add_argument("--json", default=None, help="write all results to this JSON file")
    parser.add_argument("--backends", default="torch", help="comma-separated: torch, keras-tensorflow, keras-jax, keras-torch")
    parser.add_argument("--skip", default="",
                        help="comma-separated sections to skip: training, serving, paths, frontier, extraction, memory, gpt2")
    parser.add_argument("--distributed", action="store_true",
                        help="also time torch data-parallel training: 1 process against 2 under torchrun")
    args = parser.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    steps, repeats = (2, 1) if args.smoke else (10, 5)
    results: dict = {"machine": machine(), "smoke": args.smoke, "training": [], "serving": [], "paths": [], "frontier": [],
                     "extraction": {}, "memory": [], "gpt2": {}, "distributed": []}

    for backend in filter(None, args.backends.split(",")):
        if backend == "torch":
            from benchmarks import torch_bench

            for w in workloads(args.smoke):
                if "training" not in skip:
                    results["training"].append(torch_bench.training(w, steps, repeats))
                if "serving" not in skip:
                    results["serving"] += torch_bench.serving(w, 1 if args.smoke else SERVING_ROUNDS)
            if "paths" not in skip:
                from benchmarks import serving_bench

                results["paths"] += serving_bench.paths(args.smoke)
            if "frontier" not in skip:
                from benchmarks import serving_bench

                results["frontier"] += serving_bench.frontier_time(args.smoke)
        elif backend.startswith("keras-"):
            results_keras = _keras(backend.split("-", 1)[1], args.smoke, skip)
            results["training"] += results_keras["training"]
            results["serving"] += results_keras["serving"]
            if "paths" not in skip:
                results["paths"] += _keras_paths(backend.split("-", 1)[1], args.smoke)
        else:
            raise SystemExit(f"unknown backend {backend!r}; use torch or keras-<tensorflow|jax|torch>")

    if "extraction" not in skip:
        from benchmarks import extraction_bench

        results["extraction"] = extraction_bench.run(smoke=args.smoke)
    if "memory" not in skip:
        from benchmarks import memory_bench

        results["memory"] = memory_bench.run(args.smoke, [b for b in args.backends.split(",") if b])
    if args.distributed:
        from benchmarks import distributed_bench

        results["distributed"] = distributed_bench.run(args.smoke)
    if "gpt2" not in skip:
        from benchmarks import gpt2_bench

        results["gpt2"] = gpt2_bench.run(args.smoke)

    _print(results)
    if args.json:
        write_json(args.json, results)
    return 0


def _keras(engine: str, smoke: bool, skip: set) -> dict:
    """Runs benchmarks/keras_bench.py in a fresh process with KERAS_BACKEND=engine."""
    import json
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "keras.json")
        cmd = [sys.executable, os.path.join(HERE, "keras_bench.py"), "--json", path, "--skip", ",".join(skip)]
        env = {**os.environ, "KERAS_BACKEND": engine, "TF_CPP_MIN_LOG_LEVEL": "2"}
        env.setdefault("KERAS_HOME", os.path.join(tmp, "keras-home"))
        subprocess.run(cmd + (["--smoke"] if smoke else []), check=True, env=env)
        with open(path) as f:
            return json.load(f)


def _keras_paths(engine: str, smoke: bool) -> list:
    """Runs benchmarks/serving_bench.py in a fresh process with KERAS_BACKEND=engine."""
    import json
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "paths.json")
        cmd = [sys.executable, os.path.join(HERE, "serving_bench.py"), "--engine", engine, "--json", path]
        env = {**os.environ, "KERAS_BACKEND": engine, "TF_CPP_MIN_LOG_LEVEL": "2"}
        env.setdefault("KERAS_HOME", os.path.join(tmp, "keras-home"))
        subprocess.run(cmd + (["--smoke"] if smoke else []), check=True, env=env)
        with open(path) as f:
            return json.load(f)["paths"]


def _print(r: dict) -> None:
    print(f"machine: {r['machine']}")
    if r["training"]:
        print("\nTraining step (ratio = MatTA step / sum of plain steps of every size; goal <= 1.10)")
        print(table(r["training"], ["workload", "backend", "matta_step_s", "plain_sum_s", "train_ratio", "matformer_step_s", "matformer_ratio"]))
        print("(matformer_ratio = MatTA step / MatFormer-pattern step: a backward per granularity, then one optimizer step; torch)")
    if r["serving"]:
        print("\nServing (serve_ratio = extracted Student / independent plain model, goal <= 1.02; nested_ratio = nested at S / "
              "extracted; both the median of per-round ratios)")
        print(table(r["serving"], ["workload", "backend", "batch", "rounds", "extracted_s", "plain_s", "serve_ratio", "nested_s", "nested_ratio"]))
    if r["paths"]:
        print("\nServing paths of the extracted Student S (ratio = path / plain torch module, paired rounds)")
        print(table(r["paths"], ["workload", "path", "batch", "rounds", "ms", "plain_torch_ms", "ratio"]))
    if r["frontier"]:
        print("\nMatTA.frontier over the demo's models (default candidates, random held-out data)")
        print(table(r["frontier"], ["task", "backend", "models", "rounds", "frontier_s"]))
    if r["extraction"]:
        e = r["extraction"]
        print("\nExtraction at scale (time goal <= 2x a plain copy of the Student's bytes; memory goal <= 1.2x the Student)")
        print(table([e], ["spec", "ta_params", "student_params", "extract_s", "copy_s", "time_ratio", "peak_extra_bytes", "student_bytes", "memory_ratio"]))
    if r["memory"]:
        print("\nPeak RSS of training (MatTA vs the TA alone)")
        print(table(r["memory"], ["workload", "backend", "matta_rss_mb", "ta_rss_mb", "rss_ratio", "matta_delta_mb", "ta_delta_mb", "delta_ratio"]))
    if r.get("distributed"):
        from benchmarks.distributed_bench import COLUMNS

        print("\nData-parallel training, torch, gloo (1 process vs 2 under torchrun; the processes share this machine's cores)")
        print(table(r["distributed"], COLUMNS))
        print("(overhead_s = 2-process step - 1-process step at half the batch: communication, synchronisation and "
              "core sharing together, an upper bound on communication)")
    if r.get("gpt2"):
        from benchmarks.gpt2_bench import COLUMNS

        print("\nGPT-2 checkpoint: read + extract + write vs transformers' from_pretrained + save_pretrained "
              "(goals: time_ratio <= 1.0, matta_memory_ratio <= 1.2)")
        print(table([r["gpt2"]], COLUMNS))


if __name__ == "__main__":
    sys.exit(main())
