"""Batch export: several models of one MatTA run, chosen by name, granularity or budget, with a manifest.

:func:`export_many` writes one folder per chosen model and ``manifest.json`` into
a temporary folder beside the target, which then replaces the target in one
step (:func:`matta.saving.atomic_folder`, rule E6): the target holds the
complete old export or the complete new one. A model folder holds, by format:

* ``safetensors``: matta's ``spec.json`` and ``weights.safetensors`` (rule E5),
  with the folder's own ``manifest.json``, so :func:`matta.load` reads it;
* ``native``: the backend's own file (torch: ``model.pt2``) beside those, the
  folder :meth:`matta.Extracted.save` writes;
* ``onnx``: ``model.onnx`` (:func:`matta.onnx.export`).

The export's ``manifest.json`` records per model its granularity, spec,
parameters, FLOPs, metrics and latency, every file's size and SHA-256, and, for
the whole export, the data and batch size the figures were measured on, the
matta version and the source model's checksum.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import numpy as np

from matta import saving
from matta.errors import InputError, OptionError, describe, integer
from matta.frontier import Budget, Frontier, candidates, check_data, check_metric, measure, name_of
from matta.nesting import Granularity
from matta.specs import Transformer

__all__ = ["FORMATS", "EXPORT_FORMAT", "BUDGET_KEYS", "check_formats", "parse_budget", "weights_checksum", "export_many"]

#: Formats :func:`export_many` writes.
FORMATS = ("safetensors", "onnx", "native")
#: The export manifest's format tag.
EXPORT_FORMAT = "matta.export/1"
#: The ONNX file's name in a model folder.
ONNX_FILE = "model.onnx"
#: Budget names of the command line -> :class:`~matta.frontier.Budget` fields.
BUDGET_KEYS = {"params": "max_params", "flops": "max_flops", "latency_ms": "max_latency_ms"}
_SUFFIXES = {"k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}

Target = Union[str, float, Mapping[str, Any], Granularity, Budget]


def check_formats(formats: Any) -> tuple[str, ...]:
    """``formats`` as a tuple of distinct names from :data:`FORMATS` (a comma-separated string also works)."""
    if isinstance(formats, str):
        formats = [f.strip() for f in formats.split(",") if f.strip()]
    if not isinstance(formats, (list, tuple)) or not formats:
        raise OptionError(f"formats must be a non-empty list drawn from {describe(FORMATS)}; got {formats!r}")
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise OptionError(f"formats must be drawn from {describe(FORMATS)}; got {bad[0]!r}")
    return tuple(dict.fromkeys(formats))


def _parse_number(key: str, text: str) -> float:
    text = text.strip()
    scale = _SUFFIXES.get(text[-1:], 1.0) if text else 1.0
    body = text[:-1] if scale != 1.0 else text
    try:
        value = float(body) * scale
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise OptionError(f"--budget {key}= takes numbers > 0, optionally with a suffix k, M or G (10k = 10000); got {text!r}")
    return value


def parse_budget(text: str) -> list[Budget]:
    """The budgets of one ``--budget`` option: ``params=10k,50k`` is two budgets, one per value.

    Keys are those of :data:`BUDGET_KEYS`; values take the suffixes ``k``, ``M``, ``G`` (``10k`` = 10000).
    """
    key, sep, values = text.partition("=")
    key = key.strip()
    if not sep or key not in BUDGET_KEYS:
        raise OptionError(f"--budget must be KEY=VALUE[,VALUE...] with KEY {describe(BUDGET_KEYS)}; got {text!r}")
    items = [v for v in values.split(",") if v.strip()]
    if not items:
        raise OptionError(f"--budget {key}= needs at least one value; got {text!r}")
    return [Budget(**{BUDGET_KEYS[key]: _parse_number(key, v)}) for v in items]


def weights_checksum(weights: Mapping[str, np.ndarray]) -> str:
    """The SHA-256 of the ``weights.safetensors`` that :meth:`matta.MatTA.save` writes for ``weights``.

    It equals that file's entry in the saved model's ``manifest.json``; nothing is written.
    """
    digest = hashlib.sha256()

    class _Hasher(saving.SaveFolder):
        def write_bytes(self, name: str, chunks: Iterable[Any]) -> None:
            for chunk in chunks:
                digest.update(memoryview(chunk).cast("B"))

    _Hasher("").write_weights(saving.WEIGHTS_FILE, weights)
    return digest.hexdigest()


def _data_checksum(x: np.ndarray, y: np.ndarray) -> str:
    digest = hashlib.sha256()
    for a in (x, y):
        a = np.ascontiguousarray(a)
        digest.update(f"{a.dtype.str}{a.shape};".encode())
        digest.update(a.reshape(-1).view(np.uint8))
    return digest.hexdigest()


def _targets(model: Any, targets: Any) -> list[tuple[str, Union[Budget, Granularity]]]:
    """``(label, budget or granularity)`` per target, checked; default: every Student and the TA."""
    if targets is None:
        targets = [*model.students, "TA"]
    if isinstance(targets, (str, float, Granularity, Budget, Mapping)):
        targets = [targets]
    if not isinstance(targets, (list, tuple)) or not targets:
        raise OptionError("targets must be a non-empty list of names, granularities or budgets (or one of them)")
    out: list[tuple[str, Union[Budget, Granularity]]] = []
    for t in targets:
        if isinstance(t, Mapping) and t and set(t) <= set(BUDGET_KEYS.values()):
            t = Budget.from_dict(t)
        if isinstance(t, Budget):
            if not t.to_dict():
                raise OptionError("a budget must set max_params, max_flops or max_latency_ms")
            out.append((str(t), t))
        else:
            g = model.granularity(t)
            out.append((t if isinstance(t, str) else name_of(model, g), g))
    return out


def _slug(name: str, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9._]+", "-", re.sub(r"[\[\]]", "", name)).strip("-.") or "model"
    slug, n = base, 2
    while slug in taken:
        slug, n = f"{base}-{n}", n + 1
    taken.add(slug)
    return slug


def _finite(value: Optional[float]) -> Optional[float]:
    return None if value is None or not math.isfinite(value) else float(value)


def _write_model(extracted: Any, path: str, formats: Sequence[str]) -> None:
    """One model folder in ``formats`` (see the module docstring)."""
    from matta import onnx

    if "safetensors" in formats or "native" in formats:
        with saving.atomic_save(path, kind=saving.FORMAT) as folder:
            saving.write_extracted(folder, extracted.spec, extracted.weights,
                                   {"backend": extracted.backend.name, **extracted.info})
            if "native" in formats:
                extracted.backend.export(extracted.model, extracted.spec, folder.path)
            if "onnx" in formats:
                onnx.export(extracted.spec, extracted.weights, os.path.join(folder.path, ONNX_FILE))
    else:
        os.mkdir(path)  # inside the export's temporary folder
        onnx.export(extracted.spec, extracted.weights, os.path.join(path, ONNX_FILE))


def export_many(
    model: Any,
    directory: str,
    targets: Any = None,
    formats: Any = ("safetensors",),
    *,
    x_val: Optional[np.ndarray] = None,
    y_val: Optional[np.ndarray] = None,
    batch_size: int = 1,
    metric: Optional[str] = None,
    rounds: int = 30,
    overwrite: bool = False,
    source_path: Optional[str] = None,
    data_path: Optional[str] = None,
) -> dict[str, Any]:
    """Writes the models of ``targets`` in ``formats`` and ``manifest.json`` into ``directory``, atomically.

    Budgets choose among :func:`~matta.frontier.candidates` (and the named targets) with
    :meth:`~matta.frontier.Frontier.select`; they need held-out data. With data every exported
    model's metrics and latency are measured; without, they are ``null`` in the manifest. Targets
    that choose the same granularity share one folder. Every argument is checked before any work.

    Returns:
        The manifest, as written.

    Raises:
        OptionError: a bad format, budget or target, or a budget without data; or a budget nothing fits.
        SaveError: ``directory`` is not an earlier export (and ``overwrite`` is false), or writing failed.
    """
    formats = check_formats(formats)
    metric = check_metric(model.spec, model.options.task, metric)
    if (x_val is None) != (y_val is None):
        raise InputError("give both x_val and y_val, or neither")
    if x_val is not None:
        x_val, y_val = check_data(model, x_val, y_val, batch_size)
    integer("batch_size", batch_size, 1)
    integer("rounds", rounds, 1)
    chosen = _targets(model, targets)
    budgets = [t for _, t in chosen if isinstance(t, Budget)]
    if budgets and x_val is None:
        raise OptionError("budgets choose by held-out metric and latency: pass x_val and y_val (--data on the command line)")
    target = os.path.abspath(os.fspath(directory))
    saving.check_target(target, overwrite=overwrite, kind=EXPORT_FORMAT)
    if "onnx" in formats:
        from matta.onnx import _import_onnx

        _import_onnx()  # a missing onnx package is reported before any work

    pool: dict[Granularity, str] = {}
    for name, t in chosen:
        if isinstance(t, Granularity):
            pool.setdefault(t, name)
    if budgets:
        for name, g in candidates(model.spec, model.students):
            pool.setdefault(g, name)
    frontier: Frontier = measure(model, [(n, g) for g, n in pool.items()], x_val, y_val, batch_size=batch_size,
                                 metric=metric, rounds=rounds, latency=x_val is not None)
    picks: dict[Granularity, tuple[Any, list[dict[str, Any]]]] = {}
    for name, t in chosen:
        row = frontier.select(t) if isinstance(t, Budget) else frontier[pool[t]]
        entry = {"budget": t.to_dict()} if isinstance(t, Budget) else {"granularity": name}
        picks.setdefault(row.granularity, (row, []))[1].append(entry)

    import matta

    with saving.atomic_folder(target, overwrite=overwrite, kind=EXPORT_FORMAT) as out:
        taken: set[str] = set()
        models = []
        for row, wanted in picks.values():
            folder = _slug(row.name, taken)
            extracted = model.extract(row.granularity)
            extracted.info["source"]["name"] = row.name
            _write_model(extracted, os.path.join(out.path, folder), formats)
            models.append({
                "name": row.name, "folder": folder, "targets": wanted,
                "granularity": row.granularity.to_dict(model.spec), "spec": row.spec.to_dict(),
                "params": row.params, "flops": row.flops,
                "metrics": {k: _finite(v) for k, v in row.metrics.items()} or None,
                "latency_ms": _finite(row.latency_ms), "files": out.listing(folder),
            })
        data = None if x_val is None else {
            "examples": frontier.examples, "x_shape": list(x_val.shape), "sha256": _data_checksum(x_val, y_val),
            "file": data_path,
        }
        manifest = {
            "format": EXPORT_FORMAT,
            "matta_version": matta.__version__,
            "source": {"weights_sha256": weights_checksum(model.weights), "path": source_path,
                       "spec": model.spec.to_dict(), "backend": model.backend.name,
                       "students": {n: g.to_dict(model.spec) for n, g in model.students.items()}},
            "formats": list(formats),
            "measured_on": {
                "data": data, "metric": frontier.metric, "batch_size": batch_size if frontier.latency_measured else None,
                "latency_rounds": frontier.rounds or None, "backend": frontier.backend,
                "flops_per": f"sequence of {frontier.seq_len or model.spec.max_len} tokens"
                if isinstance(model.spec, Transformer) else "example",
            },
            "models": models,
        }
        out.write_json(saving.MANIFEST_FILE, manifest)
    return manifest
