"""Teachers: a larger model per task, trained first on the true labels and cached on disk.

A cached Teacher is the framework-neutral saved format (``spec.json`` +
``weights.safetensors``, no pickle) plus ``teacher.json`` holding the cache key
and its training facts, written as one atomic save with a checksum manifest
(rule E6); a cached folder that fails its checks is trained again. The key
hashes everything that decides the Teacher's weights (recipe, data, backend,
seed), so a changed recipe never reuses a stale Teacher, and a rerun with the
same recipe reuses it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any, Optional

import numpy as np

from matta import saving
from matta.demo.config import TaskConfig, writes_files
from matta.demo.data import Dataset, fingerprint
from matta.errors import FormatError

__all__ = ["teacher_key", "get_teacher", "spec_of", "BatchMemo", "default_cache_dir"]

#: Bumped whenever the way a Teacher is trained changes, so old caches are not reused.
RECIPE = "matta.demo.teacher/1"
TEACHER_FILE = "teacher.json"


def default_cache_dir() -> str:
    """``$MATTA_CACHE`` or ``$XDG_CACHE_HOME/matta/teachers`` (``~/.cache/matta/teachers``)."""
    if os.environ.get("MATTA_CACHE"):
        return os.environ["MATTA_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "matta", "teachers")


def spec_of(cfg: TaskConfig, which: str):
    """The ``MLP``/``Transformer`` spec of the Teacher (``"teacher"``) or the TA (``"ta"``)."""
    from matta import MLP, Transformer

    kwargs = dict(cfg.teacher if which == "teacher" else cfg.ta)
    return MLP(**kwargs) if cfg.task == "digits" else Transformer(**kwargs)


def teacher_key(cfg: TaskConfig, data: Dataset, backend: str, seed: int = 0) -> str:
    """The cache key: a hash of the Teacher's recipe, its training data, the backend and the seed."""
    content = {
        "recipe": RECIPE,
        "task": cfg.task,
        "spec": spec_of(cfg, "teacher").to_dict(),
        "steps": cfg.teacher_steps,
        "batch_size": cfg.batch_size,
        "learning_rate": cfg.teacher_learning_rate,
        "weight_decay": cfg.teacher_weight_decay,
        "learning_rate_schedule": cfg.teacher_learning_rate_schedule,
        "warmup_steps": cfg.teacher_warmup_steps,
        "data": fingerprint(data.x_train, data.y_train),
        "backend": backend,
        "seed": seed,
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:20]


def get_teacher(
    cfg: TaskConfig,
    data: Dataset,
    backend: str,
    cache_dir: Optional[str],
    seed: int = 0,
    progress: bool = True,
    log=print,
) -> tuple[Any, dict[str, Any]]:
    """Loads the task's Teacher from ``cache_dir`` or trains it (on the true labels) and caches it.

    The Teacher's seed is fixed (not the run's seed): it plays the part of a
    given, pre-trained model that every seed of the study distils from.

    Returns:
        ``(teacher, info)``: a :class:`matta.Extracted` and JSON-ready facts
        (``key``, ``cached``, ``path``, ``train_seconds``).
    """
    from matta import MatTA, load

    key = teacher_key(cfg, data, backend, seed)
    path = os.path.join(cache_dir, f"{cfg.task}-{key}") if cache_dir else None
    if path and os.path.lexists(path):
        try:
            meta = saving.open_save(path).read_json(TEACHER_FILE)
            if meta.get("key") != key:
                raise FormatError(f"{path} holds a Teacher with key {meta.get('key')!r}, expected {key!r}")
            teacher = load(path, backend=backend)
            log(f"[{cfg.task}] Teacher: reusing the cached one in {path}")
            return teacher, {**meta, "cached": True, "path": path}
        except FormatError as exc:
            log(f"[{cfg.task}] Teacher: the cached one in {path} is unusable ({exc}); training it again")

    log(f"[{cfg.task}] Teacher: training {spec_of(cfg, 'teacher').num_params:,} parameters for {cfg.teacher_steps} steps")
    start = time.perf_counter()
    model = MatTA(
        spec_of(cfg, "teacher"), students={}, backend=backend, seed=seed,
        learning_rate=cfg.teacher_learning_rate, weight_decay=cfg.teacher_weight_decay,
        learning_rate_schedule=cfg.teacher_learning_rate_schedule, warmup_steps=cfg.teacher_warmup_steps,
    )
    model.fit(data.x_train, data.y_train, steps=cfg.teacher_steps, batch_size=cfg.batch_size, progress=progress)
    teacher = model.extract()
    meta = {"key": key, "recipe": RECIPE, "task": cfg.task, "backend": backend, "seed": seed,
            "train_seconds": time.perf_counter() - start}
    if path and writes_files():
        # One atomic save (rule E6): an interrupted run never leaves a half Teacher, and a damaged one is replaced.
        with saving.atomic_save(path, kind=saving.FORMAT, overwrite=True) as folder:
            saving.write_extracted(folder, teacher.spec, teacher.weights, {"teacher": meta})
            folder.write_json(TEACHER_FILE, meta)
    return teacher, {**meta, "cached": False, "path": path}


class BatchMemo:
    """A Teacher callable that remembers its outputs per batch.

    MatTA and the baselines of one seed draw the very same batches (the batch
    order depends only on the seed), so the Teacher runs once per batch instead
    of once per batch per model. Outputs are kept as float16 logits to halve the
    memory; every model of the seed sees the same stored values.
    """

    def __init__(self, teacher: Any, max_items: int = 4096):
        self.teacher = teacher
        self.max_items = max_items
        self.store: dict[bytes, np.ndarray] = {}
        self.hits = 0
        self.calls = 0

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.calls += 1
        k = hashlib.blake2b(np.ascontiguousarray(x).tobytes(), digest_size=16).digest() + str(x.shape).encode()
        out = self.store.get(k)
        if out is None:
            out = self.teacher.predict(x).astype(np.float16)
            if len(self.store) < self.max_items:
                self.store[k] = out
        else:
            self.hits += 1
        return out.astype(np.float32)
