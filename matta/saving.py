"""Atomic writes and saved folders (rules E5, E6): contained writes, a checksum manifest, reads that refuse damaged files.

Writing has one mechanism for every file and folder matta writes:

* :func:`atomic_folder`: a folder of any layout is written into a fresh
  temporary folder beside the target, flushed (files and folders), and replaces
  the target in one step, so the target always holds the complete old tree or
  the complete new one; nothing of the old survives, and nothing inside the
  target is ever opened, so a symlink planted there is never followed.
  :func:`check_target` says which targets it replaces without ``overwrite``.
* :func:`atomic_file`: one file, written beside its path, flushed and renamed over it.
* :func:`atomic_save`: an :func:`atomic_folder` that is a save.

A save is a flat folder of plain files plus ``manifest.json``, which records
every other file's size and SHA-256 and the save's kind:

* ``matta.extracted/1`` (:meth:`matta.Extracted.save`): ``spec.json`` (format
  tag, spec, dtype, parameter count, where the model came from),
  ``weights.safetensors`` (rule P2 layout) and the backend's native file;
* ``matta.model/1`` (:meth:`matta.MatTA.save`): ``model.json`` (everything
  that rebuilds the MatTA) and ``weights.safetensors`` (the TA's weights);
* ``matta.checkpoint/1`` (:mod:`matta.checkpoints`): one training checkpoint.

Reading (:func:`open_save`): every file is opened without following symlinks,
read once, checked against the manifest, and parsed with bounds checks (the
safetensors header is parsed here, against the file's size) before anything
is built; a damaged or hostile file raises :class:`~matta.errors.FormatError`.
Nothing is ever unpickled: JSON and safetensors carry no code.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import math
import os
import secrets
import shutil
import stat
import sys
from contextlib import contextmanager
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Mapping, Optional, Union

import numpy as np

from matta.errors import FormatError, MattaError, SaveError
from matta.specs import Spec, spec_from_dict
from matta.weights import check_weights

__all__ = [
    "FORMAT",
    "MODEL_FORMAT",
    "MANIFEST_FORMAT",
    "CHECKPOINT_FORMAT",
    "SaveFolder",
    "SavedFolder",
    "atomic_folder",
    "atomic_file",
    "atomic_save",
    "check_target",
    "folder_kind",
    "open_save",
    "write",
    "read",
    "write_extracted",
    "write_model",
    "read_model",
    "is_save",
]

FORMAT = "matta.extracted/1"
MODEL_FORMAT = "matta.model/1"
MANIFEST_FORMAT = "matta.manifest/1"
CHECKPOINT_FORMAT = "matta.checkpoint/1"
KINDS = (FORMAT, MODEL_FORMAT, CHECKPOINT_FORMAT)
SPEC_FILE = "spec.json"
MODEL_FILE = "model.json"
WEIGHTS_FILE = "weights.safetensors"
MANIFEST_FILE = "manifest.json"

#: Largest JSON file a read accepts; matta's own are a few kilobytes.
MAX_JSON_BYTES = 16 << 20
#: Largest safetensors header a read accepts (the safetensors library's own limit).
MAX_HEADER_BYTES = 100 << 20
#: safetensors dtype code -> numpy dtype, for the dtypes matta saves (rule P2 weights).
SAFETENSORS_DTYPES = {"F32": np.dtype("<f4"), "F64": np.dtype("<f8")}
_CODES = {v.name: k for k, v in SAFETENSORS_DTYPES.items()}
_CHUNK = 1 << 20

PathLike = Union[str, "os.PathLike[str]"]


# ---------------------------------------------------------------------- writing
class SaveFolder:
    """The temporary folder of one atomic write; what is written here is hashed on the way.

    Attributes:
        path: the temporary folder (backends and other writers write into it by path).
        files: after :meth:`write_manifest`, the names of the save's files (all but ``manifest.json``).
    """

    def __init__(self, path: str):
        self.path = path
        self.files: list[str] = []
        self._hashes: dict[str, tuple[int, str]] = {}
        self._written: set[str] = set()
        self._reserved: set[str] = set()

    def write_bytes(self, name: str, chunks: Iterable[Union[bytes, memoryview]]) -> None:
        """Writes ``chunks`` to a new file ``name`` (a ``/``-separated path in the folder; never an existing file, never through a symlink)."""
        self._write(name, chunks)

    def _write(self, name: str, chunks: Iterable[Union[bytes, memoryview]], manifest: bool = False) -> None:
        if not (manifest or (_relative_path(name) and name not in self._reserved)):
            raise SaveError(errno.EINVAL, f"file names in a folder must be relative paths of plain names, "
                                          f"other than {sorted(self._reserved)}; got {name!r}")
        path = os.path.join(self.path, *name.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        digest, size = hashlib.sha256(), 0
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o666)
        try:
            for chunk in chunks:
                view = memoryview(chunk).cast("B")
                digest.update(view)
                size += len(view)
                while len(view):
                    view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        self._hashes[name] = (size, digest.hexdigest())
        self._written.add(name)

    def write_json(self, name: str, value: Mapping[str, Any]) -> None:
        """Writes ``value`` as JSON (strict: no NaN or Infinity)."""
        self.write_bytes(name, [json.dumps(value, indent=2, sort_keys=True, allow_nan=False).encode() + b"\n"])

    def write_weights(self, name: str, weights: Mapping[str, np.ndarray], metadata: Optional[Mapping[str, str]] = None) -> None:
        """Writes ``weights`` as a safetensors file, streamed tensor by tensor (no second copy in memory).

        ``metadata`` is the file's ``__metadata__`` (string to string), e.g. ``{"format": "pt"}``,
        which ``transformers`` requires.
        """
        header: dict[str, Any] = {} if metadata is None else {"__metadata__": dict(metadata)}
        arrays = []
        offset = 0
        for key in sorted(weights):
            a = np.ascontiguousarray(weights[key]).reshape(np.shape(weights[key]))  # ascontiguousarray makes 0-d 1-d
            code = _CODES.get(a.dtype.name)
            if code is None:
                raise SaveError(errno.EINVAL, f"weights[{key!r}] has dtype {a.dtype}; a save holds {sorted(_CODES)}")
            a = a.astype(SAFETENSORS_DTYPES[code], copy=False)
            header[key] = {"dtype": code, "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
            offset += a.nbytes
            arrays.append(a)
        head = json.dumps(header, separators=(",", ":")).encode()
        head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        self.write_bytes(name, [len(head).to_bytes(8, "little"), head, *(a.reshape(-1).view(np.uint8) for a in arrays)])

    def listing(self, under: str = "") -> dict[str, dict[str, Any]]:
        """Size and SHA-256 of every file in the folder (or in its subfolder ``under``), flushed to disk.

        Keys are ``/``-separated paths from the folder's top, sorted. Files the folder did
        not write itself (a backend's, another library's) are hashed here.

        Raises:
            SaveError: the tree holds a symlink or anything but plain files and folders.
        """
        out = {}
        for name, path in _tree(self.path, under):
            if name not in self._hashes:
                self._hashes[name] = _hash_file(path)
            size, digest = self._hashes[name]
            out[name] = {"size": size, "sha256": digest}
        return dict(sorted(out.items()))

    def write_manifest(self, kind: str) -> None:
        """Writes ``manifest.json`` at the top: ``kind`` and every other file's size and SHA-256 (rule E6).

        A save is flat: its files are plain names in the folder itself, which is
        what :func:`open_save` reads back.
        """
        entries = self.listing()
        for name in entries:
            if "/" in name:
                raise SaveError(errno.EINVAL, f"a save holds plain files only; {name.split('/')[0]!r} in the save is not one")
            if not _plain_name(name):
                raise SaveError(errno.EINVAL, f"a save cannot hold a file named {name!r}")
        manifest = {"format": MANIFEST_FORMAT, "kind": kind, "files": entries}
        self._write(MANIFEST_FILE, [json.dumps(manifest, indent=2, sort_keys=True).encode() + b"\n"], manifest=True)
        self.files = sorted(entries)

    def _flush(self) -> None:
        """Flushes every file, then every folder, deepest first.

        A file the folder did not write itself gets the mode of one it writes
        (``0o666`` less the umask, read off the folder's own ``0o777`` less the
        umask): libraries differ (safetensors writes ``0o600``).
        """
        mode = stat.S_IMODE(os.lstat(self.path).st_mode) & 0o666
        folders = {self.path}
        for name, path in _tree(self.path, ""):
            if name not in self._written:
                fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _CLOEXEC)
                try:
                    os.fchmod(fd, mode)
                    os.fsync(fd)
                finally:
                    os.close(fd)
            folders.add(os.path.dirname(path))
        for path in sorted(folders, key=len, reverse=True):
            _fsync(path, os.O_RDONLY | _DIRECTORY)


@contextmanager
def atomic_folder(target: PathLike, *, overwrite: bool = False, kind: Optional[str] = None) -> Iterator[SaveFolder]:
    """Yields a :class:`SaveFolder` whose tree replaces ``target`` as one step when the block ends (rule E6).

    The folder may hold any layout (nested folders too); it is created beside the
    target, every file and folder in it is flushed, and it replaces the target in
    one step, so the target always holds the complete old tree or the complete new
    one and nothing of the old survives. Nothing inside the target is opened, so a
    symlink planted there is never followed. With ``renameat2(RENAME_EXCHANGE)``
    (Linux) the swap is one atomic step; where the file system lacks it, the old
    tree is renamed aside, the new one renamed in, and the old removed: a process
    killed between those two renames leaves the target missing and the complete
    old tree beside it as ``.<name>.matta-old-*``. Leftovers of killed writes are
    removed by the next write beside the same target. Files and folders get the
    usual permissions (``0o666`` and ``0o777`` less the umask).

    Args:
        target: the folder to write.
        overwrite: replace ``target`` whatever it is (a non-empty folder, a file, or a
            symlink, which is replaced, never followed); see :func:`check_target`.
        kind: the kind of matta folder written (``matta.<noun>/<version>``, as
            :func:`folder_kind` reads it back); a target of the same kind is replaced
            without ``overwrite``. The caller writes the folder's ``manifest.json``
            (:meth:`SaveFolder.write_manifest` for a save).

    Raises:
        SaveError: ``target`` may not be replaced (:func:`check_target`), or writing
            failed (e.g. a full disk); the old target is then unchanged.
    """
    target = os.path.abspath(os.fspath(target))
    try:
        check_target(target, overwrite=overwrite, kind=kind)
    except OSError as exc:
        raise _save_error(target, exc) from exc
    with _beside(target, _make_dir) as tmp:
        folder = SaveFolder(tmp)
        yield folder
        folder._flush()
        _swap_in(tmp, target)


@contextmanager
def atomic_file(path: PathLike) -> Iterator[BinaryIO]:
    """Yields a binary file whose bytes replace the file ``path`` in one rename when the block ends (rule E6).

    The file is written beside ``path`` (parent folders are created), flushed,
    and renamed over ``path``, so ``path`` always holds the complete old file or
    the complete new one. A symlink at ``path`` is replaced, never followed. The
    file gets the usual permissions (``0o666`` less the umask).

    Raises:
        SaveError: writing failed (e.g. a full disk, or ``path`` is a folder); the old file is then unchanged.
    """
    path = os.path.abspath(os.fspath(path))
    with _beside(path, _make_file) as tmp:
        with open(tmp, "wb", opener=lambda p, flags: os.open(p, os.O_WRONLY | _NOFOLLOW | _CLOEXEC)) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
        _fsync(os.path.dirname(path), os.O_RDONLY | _DIRECTORY)


@contextmanager
def _beside(target: str, make: Callable[[str], None]) -> Iterator[str]:
    """A fresh temporary path beside ``target``, created by ``make``, removed at the end unless renamed away.

    Leftovers of killed writes to ``target`` are removed first; an ``OSError`` becomes a :class:`SaveError`.
    """
    parent, base = os.path.split(target)
    try:
        os.makedirs(parent, exist_ok=True)
        _remove_leftovers(parent, base)
        tmp = _fresh(parent, f".{base}.matta-tmp-{os.getpid()}-", make)
    except OSError as exc:
        raise _save_error(target, exc) from exc
    try:
        yield tmp
    except OSError as exc:
        raise _save_error(target, exc) from exc
    finally:
        if os.path.lexists(tmp):
            _remove(tmp)


@contextmanager
def atomic_save(target: PathLike, *, kind: str, overwrite: bool = False) -> Iterator[SaveFolder]:
    """Yields a :class:`SaveFolder` for a flat save of ``kind``; :func:`atomic_folder` with the save's manifest.

    When the block ends, ``manifest.json`` records every file (:meth:`SaveFolder.write_manifest`)
    and the folder replaces ``target`` as one step.

    Args:
        target: the save's folder.
        kind: the save's format tag (:data:`FORMAT` or :data:`MODEL_FORMAT`).
        overwrite: replace ``target`` even when it is not a matta save (a
            non-empty folder, a file or a symlink, which is replaced, never followed).

    Raises:
        SaveError: ``target`` is not a matta save and ``overwrite`` is false, or the
            save failed (e.g. a full disk); the old save is then unchanged.
    """
    assert kind in KINDS, kind
    with atomic_folder(target, overwrite=overwrite, kind=kind) as folder:
        folder._reserved.add(MANIFEST_FILE)
        yield folder
        folder.write_manifest(kind)


def write_extracted(folder: SaveFolder, spec: Spec, weights: Mapping[str, np.ndarray], info: Optional[Mapping[str, Any]] = None) -> None:
    """Writes ``spec.json`` and ``weights.safetensors`` of an extracted model into ``folder``."""
    weights = check_weights(spec, weights)
    dtype = next(iter(weights.values())).dtype.name
    meta = {**(info or {}), "format": FORMAT, "spec": spec.to_dict(), "dtype": dtype, "num_params": spec.num_params}
    folder.write_json(SPEC_FILE, meta)
    folder.write_weights(WEIGHTS_FILE, weights)


def write_model(folder: SaveFolder, config: Mapping[str, Any], weights: Mapping[str, np.ndarray]) -> None:
    """Writes a whole MatTA's ``model.json`` (``config``, format tag included) and ``weights.safetensors``.

    A checkpoint adds its files (optimizer state, the step) beside these two;
    the manifest lists them all.
    """
    assert config.get("format") == MODEL_FORMAT
    folder.write_json(MODEL_FILE, config)
    folder.write_weights(WEIGHTS_FILE, weights)


def read_model(directory: str, *, verify: bool = True, allow_nonfinite: bool = False) -> tuple[Spec, dict[str, Any], dict[str, np.ndarray]]:
    """Reads a save of :func:`write_model`: ``(spec, config, weights)``, the spec checked against the weights.

    Raises:
        FormatError: a missing, damaged or hostile file, or files that disagree with each other.
    """
    folder = open_save(directory, verify=verify)
    folder.expect(MODEL_FORMAT)
    config = folder.read_json(MODEL_FILE)
    if config.get("format") != MODEL_FORMAT:
        raise FormatError(f"{os.path.join(directory, MODEL_FILE)} has format {config.get('format')!r}; this matta reads {MODEL_FORMAT!r}")
    spec, weights = folder.read_weights(WEIGHTS_FILE, config.get("spec"), allow_nonfinite=allow_nonfinite)
    folder.verify_rest()
    return spec, config, weights


def write(directory: str, spec: Spec, weights: Mapping[str, np.ndarray], info: Optional[Mapping[str, Any]] = None,
          *, overwrite: bool = False) -> list[str]:
    """Saves an extracted model's ``spec.json`` and ``weights.safetensors`` atomically (see :func:`atomic_save`).

    Returns:
        The file names of the save (all but ``manifest.json``).
    """
    weights = check_weights(spec, weights)
    with atomic_save(directory, kind=FORMAT, overwrite=overwrite) as folder:
        write_extracted(folder, spec, weights, info)
    return folder.files


def check_target(target: PathLike, *, overwrite: bool = False, kind: Optional[str] = None) -> None:
    """Raises :class:`SaveError` unless an atomic write of ``kind`` may replace ``target``.

    It may when ``target`` is absent, an empty folder, a matta folder that ``kind``
    replaces (a save replaces a save of either kind, any other kind only its own;
    see :func:`folder_kind`), or ``overwrite`` is true. A symlink is never followed.
    Callers with expensive work check before it; :func:`atomic_folder` checks again.
    """
    target = os.fspath(target)
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        return
    if overwrite:
        return
    noun = _noun(kind)
    if stat.S_ISLNK(st.st_mode):
        raise SaveError(errno.EEXIST, f"{target!r} is a symbolic link; pass overwrite=True to replace the link (never its target)")
    if not stat.S_ISDIR(st.st_mode):
        raise SaveError(errno.EEXIST, f"{target!r} is a file, not {noun}; pass overwrite=True to replace it")
    found = folder_kind(target)
    if os.listdir(target) and not (found is not None and (found == kind or {found, kind} <= set(KINDS))):
        what = "exists and is not empty" if kind is None else f"is a non-empty folder that is not {noun}"
        raise SaveError(errno.ENOTEMPTY, f"{target!r} {what}; pass overwrite=True to replace it")


def _noun(kind: Optional[str]) -> str:
    """What a folder of ``kind`` is called in messages: ``matta.export/1`` is "a matta export"."""
    if kind is None:
        return "a folder"
    return "a matta save" if kind in KINDS else "a " + kind.split("/")[0].replace(".", " ")


def folder_kind(directory: PathLike) -> Optional[str]:
    """The kind of matta folder ``directory`` holds, or ``None`` for any other folder.

    The kind is a save's ``manifest.json`` kind, another matta manifest's format tag
    (an export's ``matta.export/1``), or :data:`FORMAT` for a save written before
    matta kept manifests (a ``spec.json`` of that format). Files are read without
    following symlinks.
    """
    directory = os.fspath(directory)
    for name in (MANIFEST_FILE, SPEC_FILE):
        try:
            value = _parse_json(_read_plain(os.path.join(directory, name), MAX_JSON_BYTES), name)
        except (OSError, FormatError):
            continue
        tag = value.get("kind") if value.get("format") == MANIFEST_FORMAT else value.get("format")
        if isinstance(tag, str) and tag.startswith("matta.") and (name == MANIFEST_FILE or tag == FORMAT):
            return tag
    return None


def is_save(directory: str) -> bool:
    """Whether ``directory`` holds a matta save (a matta manifest of a save's kind, or a ``spec.json`` of matta's format)."""
    return folder_kind(directory) in KINDS


def _swap_in(tmp: str, target: str) -> None:
    """Puts ``tmp`` at ``target`` in one step: a rename, an exchange, or rename aside and in (see :func:`atomic_folder`)."""
    parent, base = os.path.split(target)
    if not os.path.lexists(target):
        os.rename(tmp, target)
    elif _exchange(tmp, target):
        _remove(tmp)  # ``tmp`` now names the old tree
    else:
        aside = _fresh(parent, f".{base}.matta-old-{os.getpid()}-", _unused)
        os.rename(target, aside)
        try:
            os.rename(tmp, target)
        except BaseException:
            os.rename(aside, target)
            raise
        _remove(aside)
    _fsync(parent, os.O_RDONLY | _DIRECTORY)


def _unused(path: str) -> None:
    if os.path.lexists(path):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), path)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_renameat2: Any = None


def _exchange(a: str, b: str) -> bool:
    """Swaps two paths in one step with Linux's ``renameat2(RENAME_EXCHANGE)``; ``False`` where unsupported."""
    global _renameat2
    if not sys.platform.startswith("linux"):
        return False
    if _renameat2 is None:
        fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", False)
        if fn:
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            fn.restype = ctypes.c_int
        _renameat2 = fn
    if not _renameat2:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), b)


def _remove_leftovers(parent: str, base: str) -> None:
    """Removes temporary and set-aside files and folders of earlier writes to this target whose process has ended."""
    prefixes = (f".{base}.matta-tmp-", f".{base}.matta-old-")
    for entry in os.scandir(parent):
        prefix = next((p for p in prefixes if entry.name.startswith(p)), None)
        if prefix is None:
            continue
        pid = entry.name[len(prefix):].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            _remove(entry.path)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _fresh(parent: str, prefix: str, make: Callable[[str], None]) -> str:
    """A new path ``prefix`` + random hex in ``parent``, created by ``make`` (which fails if it exists)."""
    while True:
        path = os.path.join(parent, prefix + secrets.token_hex(4))
        try:
            make(path)
            return path
        except FileExistsError:
            continue


def _make_dir(path: str) -> None:
    os.mkdir(path)  # mode 0o777 less the umask, like any folder the user creates


def _make_file(path: str) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o666))


def _remove(path: str) -> None:
    """Removes a folder tree or a file; symlinks are removed, never followed."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _fsync(path: str, flags: int) -> None:
    fd = os.open(path, flags | _CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tree(top: str, under: str) -> Iterator[tuple[str, str]]:
    """``(name, path)`` of every file in ``top``'s subfolder ``under``; ``name`` is ``/``-separated from ``top``."""
    folder = os.path.join(top, *under.split("/")) if under else top
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        name = f"{under}/{entry.name}" if under else entry.name
        if entry.is_dir(follow_symlinks=False):
            yield from _tree(top, name)
        elif entry.is_file(follow_symlinks=False):
            yield name, entry.path
        else:
            raise SaveError(errno.EINVAL, f"a matta folder holds plain files and folders only; {name!r} is neither")


def _relative_path(name: Any) -> bool:
    """A path a writer may create in its folder: plain names joined by ``/``."""
    return isinstance(name, str) and all(_plain_name(part) or part == MANIFEST_FILE for part in name.split("/"))


def _hash_file(path: str) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _CLOEXEC)
    try:
        while chunk := os.read(fd, _CHUNK):
            digest.update(chunk)
            size += len(chunk)
        os.fsync(fd)
    finally:
        os.close(fd)
    return size, digest.hexdigest()


def _save_error(target: str, exc: OSError) -> SaveError:
    if isinstance(exc, SaveError):
        return exc
    return SaveError(exc.errno or errno.EIO, f"could not save {target!r}: {exc.strerror or exc}; the previous save there is unchanged")


# ---------------------------------------------------------------------- reading
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)


class SavedFolder:
    """An opened save: its manifest checked, each file read once and verified against it.

    Attributes:
        path: the folder.
        kind: the save's format tag.
        verify: whether sizes and SHA-256 are checked against ``manifest.json``.
    """

    def __init__(self, path: str, kind: str, files: Optional[dict[str, tuple[int, str]]], verify: bool):
        self.path = path
        self.kind = kind
        self.verify = verify
        self._files = files or {}
        self._checked: set[str] = set()

    def expect(self, kind: str) -> None:
        """Raises :class:`FormatError` unless the save is of ``kind``."""
        if self.kind != kind:
            hint = {FORMAT: "an extracted model: load it with matta.load", MODEL_FORMAT: "a MatTA: load it with MatTA.load",
                    CHECKPOINT_FORMAT: "a training checkpoint: resume it with MatTA.fit(checkpoint_dir=..., resume=True)"}
            raise FormatError(f"{self.path!r} holds a {self.kind!r} save ({hint.get(self.kind, 'unknown')}); expected {kind!r}")

    def read_bytes(self, name: str, limit: Optional[int] = None) -> bytearray:
        """The bytes of file ``name``, checked against the manifest (size, then SHA-256)."""
        path = os.path.join(self.path, name)
        if self.verify and name not in self._files:
            raise FormatError(f"{path} is not listed in {MANIFEST_FILE}")
        expected = self._files.get(name) if self.verify else None
        data = _read_plain(path, limit, None if expected is None else expected[0])
        if expected is not None and hashlib.sha256(data).hexdigest() != expected[1]:
            raise FormatError(f"{path} does not match its SHA-256 in {MANIFEST_FILE}: the file is damaged or was changed")
        self._checked.add(name)
        return data

    def read_json(self, name: str) -> dict[str, Any]:
        """File ``name`` parsed as a JSON object."""
        return _parse_json(self.read_bytes(name, MAX_JSON_BYTES), os.path.join(self.path, name))

    def read_weights(self, name: str, spec_dict: Any, *, allow_nonfinite: bool = False) -> tuple[Spec, dict[str, np.ndarray]]:
        """The spec from ``spec_dict`` and the weights of safetensors file ``name``, checked against each other.

        The header is parsed and bounds-checked against the file's size, and the
        spec's parameter names, shapes and dtype are compared with it before the
        spec's layout is built, so a spec that claims more than the file holds
        costs no more than the file's size.
        """
        path = os.path.join(self.path, name)
        entries, tensors = self._tensors(name)
        spec = _spec_for(spec_dict, entries, path)
        for key, a in tensors.items():
            if not allow_nonfinite and not np.isfinite(a).all():
                raise FormatError(f"{path}: tensor {key!r} holds NaN or Inf; pass allow_nonfinite=True to load it anyway")
        return spec, check_weights(spec, tensors)

    def read_tensors(self, name: str) -> dict[str, np.ndarray]:
        """The named tensors of safetensors file ``name`` (header bounds-checked), whatever their names and shapes."""
        return self._tensors(name)[1]

    def _tensors(self, name: str) -> tuple[dict[str, tuple], dict[str, np.ndarray]]:
        data = self.read_bytes(name)
        entries, start = _safetensors_header(data, os.path.join(self.path, name))
        tensors = {}
        for key, (dtype, shape, begin, end) in entries.items():
            a = np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=start + begin).reshape(shape)
            a = a.astype(dtype.newbyteorder("="), copy=False)
            tensors[key] = a if a.flags.aligned else a.copy()
        return entries, tensors

    def verify_rest(self) -> None:
        """Checks the listed files nobody read (e.g. the backend's native file) against the manifest."""
        if not self.verify:
            return
        for name in sorted(set(self._files) - self._checked):
            self.read_bytes(name)


def open_save(directory: str, *, verify: bool = True) -> SavedFolder:
    """Opens a save, checking ``manifest.json`` and that every file it lists is a plain file of its size.

    Args:
        directory: the save's folder.
        verify: check sizes and SHA-256 against ``manifest.json``; with ``False``
            the manifest is neither needed nor read (a folder written before
            matta kept one), every other check still applies.

    Raises:
        FormatError: not a save, or a damaged or hostile manifest.
    """
    if not os.path.isdir(directory):
        raise FormatError(f"{directory!r} is not a saved matta model: no such folder")
    manifest_path = os.path.join(directory, MANIFEST_FILE)
    if not verify:
        for name, kind in ((SPEC_FILE, FORMAT), (MODEL_FILE, MODEL_FORMAT)):
            if os.path.lexists(os.path.join(directory, name)):
                return SavedFolder(directory, kind, None, verify=False)
        raise FormatError(f"{directory!r} is not a saved matta model: it has neither {SPEC_FILE} nor {MODEL_FILE}")
    if not os.path.lexists(manifest_path):
        raise FormatError(
            f"{directory!r} is not a saved matta model: {MANIFEST_FILE} is missing "
            "(pass verify=False to load a folder saved without one)"
        )
    manifest = _parse_json(_read_plain(manifest_path, MAX_JSON_BYTES), manifest_path)
    if manifest.get("format") != MANIFEST_FORMAT:
        raise FormatError(f"{manifest_path} has format {manifest.get('format')!r}; this matta reads {MANIFEST_FORMAT!r}")
    kind = manifest.get("kind")
    if kind not in KINDS:
        raise FormatError(f"{manifest_path}: kind must be one of {list(KINDS)}; got {kind!r}")
    listed = manifest.get("files")
    if not isinstance(listed, dict):
        raise FormatError(f"{manifest_path}: files must be an object of name -> size and sha256; got {type(listed).__name__}")
    files = {}
    for name, entry in listed.items():
        if not _plain_name(name):
            raise FormatError(f"{manifest_path} lists an invalid file name {str(name)[:100]!r}")
        size = entry.get("size") if isinstance(entry, dict) else None
        digest = entry.get("sha256") if isinstance(entry, dict) else None
        if (isinstance(size, bool) or not isinstance(size, int) or size < 0 or not isinstance(digest, str)
                or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest)):
            raise FormatError(f"{manifest_path}: files[{name!r}] must be {{'size': int >= 0, 'sha256': 64 hex digits}}")
        try:
            st = os.lstat(os.path.join(directory, name))
        except FileNotFoundError:
            raise FormatError(f"{os.path.join(directory, name)} is listed in {MANIFEST_FILE} but missing") from None
        if not stat.S_ISREG(st.st_mode):
            raise FormatError(f"{os.path.join(directory, name)} is not a plain file (a symlink or folder); a save holds plain files only")
        if st.st_size != size:
            raise FormatError(f"{os.path.join(directory, name)} has {st.st_size} bytes; {MANIFEST_FILE} records {size}")
        files[name] = (size, digest)
    return SavedFolder(directory, kind, files, verify=True)


def read(directory: str, *, verify: bool = True, allow_nonfinite: bool = False) -> tuple[Spec, dict[str, np.ndarray], dict[str, Any]]:
    """Reads a save of :func:`write` or :meth:`matta.Extracted.save`: ``(spec, weights, metadata)``.

    Args:
        directory: the save's folder.
        verify: check every file against ``manifest.json`` (see :func:`open_save`).
        allow_nonfinite: accept weights holding NaN or Inf.

    Raises:
        FormatError: a missing, damaged or hostile file, or files that disagree with each other.
    """
    folder = open_save(directory, verify=verify)
    folder.expect(FORMAT)
    meta = folder.read_json(SPEC_FILE)
    spec_path = os.path.join(directory, SPEC_FILE)
    if meta.get("format") != FORMAT:
        raise FormatError(f"{spec_path} has format {meta.get('format')!r}; this matta reads {FORMAT!r}")
    spec, weights = folder.read_weights(WEIGHTS_FILE, meta.get("spec"), allow_nonfinite=allow_nonfinite)
    dtype = next(iter(weights.values())).dtype.name
    if meta.get("dtype", dtype) != dtype or meta.get("num_params", spec.num_params) != spec.num_params:
        raise FormatError(
            f"{spec_path} records dtype {meta.get('dtype')!r} and {meta.get('num_params')!r} parameters; "
            f"{WEIGHTS_FILE} holds {dtype!r} and {spec.num_params}"
        )
    folder.verify_rest()
    return spec, weights, meta


def _plain_name(name: Any) -> bool:
    """A file name a save may hold: a plain name in the folder itself, not the manifest's."""
    return (isinstance(name, str) and name not in ("", ".", "..", MANIFEST_FILE) and len(name) <= 255
            and not any(c in name for c in "/\\\0"))


def _read_plain(path: str, limit: Optional[int], size: Optional[int] = None) -> bytearray:
    """The bytes of a plain file: never through a symlink, never a FIFO or device, at most ``limit`` bytes."""
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _CLOEXEC | _NONBLOCK)
    except FileNotFoundError:
        raise FormatError(f"{path} is missing") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP or os.path.islink(path):
            raise FormatError(f"{path} is a symbolic link; a save holds plain files only") from None
        raise FormatError(f"{path} cannot be read: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FormatError(f"{path} is not a plain file")
        if size is not None and st.st_size != size:
            raise FormatError(f"{path} has {st.st_size} bytes; {MANIFEST_FILE} records {size}")
        if limit is not None and st.st_size > limit:
            raise FormatError(f"{path} has {st.st_size} bytes; at most {limit} are allowed")
        data = bytearray(st.st_size)
        view, done = memoryview(data), 0
        with os.fdopen(os.dup(fd), "rb", buffering=0) as f:
            while done < len(data):
                n = f.readinto(view[done:])
                if not n:
                    raise FormatError(f"{path} shrank while it was read")
                done += n
        return data
    finally:
        os.close(fd)


def _parse_json(data: Union[bytes, bytearray], where: str) -> dict[str, Any]:
    try:
        value = json.loads(bytes(data).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise FormatError(f"{where} is not valid JSON: {type(exc).__name__}: {str(exc)[:200]}") from None
    if not isinstance(value, dict):
        raise FormatError(f"{where} must hold a JSON object; got {type(value).__name__}")
    return value


def _safetensors_header(data: bytearray, path: str) -> tuple[dict[str, tuple[np.dtype, tuple[int, ...], int, int]], int]:
    """Parses and bounds-checks a safetensors header: ``({name: (dtype, shape, begin, end)}, data start)``."""
    if len(data) < 8:
        raise FormatError(f"{path} is truncated: {len(data)} bytes, fewer than the 8-byte header length")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8 or n > MAX_HEADER_BYTES:
        raise FormatError(f"{path}: the header claims {n} bytes; the file has {len(data) - 8} after the length (limit {MAX_HEADER_BYTES})")
    header = _parse_json(data[8:8 + n], f"{path} (safetensors header)")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise FormatError(f"{path}: __metadata__ must be an object of strings")
    size = len(data) - 8 - n
    entries = {}
    for key, e in header.items():
        where = f"{path}: tensor {key!r}"
        if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
            raise FormatError(f"{where} must be an object with exactly dtype, shape and data_offsets")
        dtype = SAFETENSORS_DTYPES.get(e["dtype"]) if isinstance(e["dtype"], str) else None
        if dtype is None:
            raise FormatError(f"{where}: dtype must be {' or '.join(map(repr, SAFETENSORS_DTYPES))}; got {e['dtype']!r}")
        shape, offsets = e["shape"], e["data_offsets"]
        if not isinstance(shape, list) or len(shape) > 8 or not all(_natural(s) for s in shape):
            raise FormatError(f"{where}: shape must be a list of at most 8 integers >= 0; got {str(shape)[:100]}")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_natural(o) for o in offsets) \
                or not offsets[0] <= offsets[1] <= size:
            raise FormatError(f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end <= {size}; got {str(offsets)[:100]}")
        if offsets[1] - offsets[0] != math.prod(shape) * dtype.itemsize:
            raise FormatError(f"{where}: shape {shape} of {e['dtype']} needs {math.prod(shape) * dtype.itemsize} bytes; "
                              f"data_offsets give {offsets[1] - offsets[0]}")
        entries[key] = (dtype, tuple(shape), offsets[0], offsets[1])
    position = 0
    for begin, end in sorted((e[2], e[3]) for e in entries.values()):
        if begin != position:
            raise FormatError(f"{path}: tensors overlap or leave a gap at byte {position} of the data")
        position = end
    if position != size:
        raise FormatError(f"{path}: the tensors cover {position} bytes of the data; the file holds {size}")
    return entries, 8 + n


def _natural(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _spec_for(spec_dict: Any, entries: Mapping[str, tuple], path: str) -> Spec:
    """The spec of ``spec_dict`` if its parameters are exactly the file's tensors (names, shapes, one dtype)."""
    if not isinstance(spec_dict, dict):
        raise FormatError(f"the spec saved with {path} must be a JSON object; got {type(spec_dict).__name__}")
    # Every block has its own tensors: a depth above the file's tensor count is refused before
    # the spec (and its per-block layout) is built.
    depth = spec_dict.get("n_layers", 0)
    if isinstance(depth, int) and depth > len(entries):
        raise FormatError(f"the spec saved with {path} has n_layers={depth}; the file holds only {len(entries)} tensors")
    try:
        spec = spec_from_dict(spec_dict)
        params = spec.parameters()
    except (MattaError, TypeError, ValueError, OverflowError, RecursionError) as exc:
        raise FormatError(f"the spec saved with {path} is invalid: {exc}") from None
    missing = sorted(set(params) - set(entries))
    extra = sorted(set(entries) - set(params))
    if missing or extra:
        raise FormatError(f"{path} does not hold the spec's tensors: missing {missing[:5]}, unexpected {extra[:5]}")
    for key, p in params.items():
        if entries[key][1] != p.shape:
            raise FormatError(f"{path}: tensor {key!r} has shape {entries[key][1]}; the spec needs {p.shape}")
    dtypes = {e[0].name for e in entries.values()}
    if len(dtypes) > 1:
        raise FormatError(f"{path} mixes dtypes {sorted(dtypes)}; a save holds one")
    return spec
