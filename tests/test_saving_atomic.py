"""The one atomic-write mechanism (rule E6): ``saving.atomic_folder`` and ``saving.atomic_file``.

What saves, exports, GPT-2 checkpoints and ONNX files rely on, tried on the two
functions themselves: a failure mid-write leaves the old target, nothing stale
or temporary is left, symlinks are never followed, a folder that is not
matta's is refused unless ``overwrite``, permissions follow the umask.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import subprocess
import sys
from contextlib import contextmanager

import numpy as np
import pytest

import matta
from matta import MLP, saving
from matta.weights import initial_weights

EXPORT = "matta.export/1"


def tree(root):
    """``{relative path: bytes}`` of every file below ``root`` (symlinks are not followed)."""
    out = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            out[os.path.relpath(path, root)] = os.readlink(path) if os.path.islink(path) else open(path, "rb").read()
    return out


def write_tree(target, files, **kwargs):
    """Writes ``files`` (``{"a/b": bytes}``) with atomic_folder."""
    with saving.atomic_folder(target, **kwargs) as folder:
        for name, data in files.items():
            folder.write_bytes(name, [data])
    return folder


@contextmanager
def umask(mask):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def modes(root):
    """Permission bits of ``root`` and of every file and folder below it."""
    out = {".": stat.S_IMODE(os.lstat(root).st_mode)}
    for folder, dirs, names in os.walk(root):
        for name in dirs + names:
            path = os.path.join(folder, name)
            out[os.path.relpath(path, root)] = stat.S_IMODE(os.lstat(path).st_mode)
    return out


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()
    return proc.pid


OLD = {"a.txt": b"old a", "sub/deep/b.bin": b"old b", "stale.txt": b"only in the old tree"}
NEW = {"a.txt": b"new a", "sub/deep/b.bin": b"new b", "sub/c.json": b"{}"}


# ---------------------------------------------------------------------- atomic_folder
@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "rename-aside"])
def test_a_nested_folder_replaces_the_old_tree_whole_and_a_failure_leaves_the_old_one(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(saving, "_exchange", lambda a, b: False)
    target = tmp_path / "out"
    write_tree(target, OLD, kind=EXPORT)
    (target / "manifest.json").write_text(json.dumps({"format": EXPORT}))
    before = tree(target)

    with pytest.raises(RuntimeError, match="a writer's own error"):
        with saving.atomic_folder(target, kind=EXPORT) as folder:
            folder.write_bytes("a.txt", [b"half"])
            raise RuntimeError("a writer's own error")  # not an OSError: it passes through as it is
    with pytest.raises(matta.SaveError, match="No space left on device.*previous save there is unchanged") as info:
        with saving.atomic_folder(target, kind=EXPORT) as folder:
            folder.write_bytes("a.txt", [b"half"])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert info.value.errno == errno.ENOSPC
    assert tree(target) == before and sorted(os.listdir(tmp_path)) == ["out"]

    with saving.atomic_folder(target, kind=EXPORT) as folder:  # an earlier folder of its kind: no overwrite needed
        for name, data in NEW.items():
            folder.write_bytes(name, [data])
        listed = folder.listing()
        assert folder.listing("sub/deep") == {"sub/deep/b.bin": listed["sub/deep/b.bin"]}
    assert tree(target) == NEW, "nothing of the old tree survives"
    assert sorted(os.listdir(tmp_path)) == ["out"]
    assert list(listed) == sorted(NEW) and listed == {
        name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()} for name, data in NEW.items()}


def test_a_folder_that_is_not_matta_s_is_refused_unless_overwrite(tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    with pytest.raises(matta.SaveError, match="exists and is not empty; pass overwrite=True") as info:
        write_tree(notes, NEW)
    assert info.value.errno == errno.ENOTEMPTY
    with pytest.raises(matta.SaveError, match="is a non-empty folder that is not a matta export; pass overwrite=True"):
        write_tree(notes, NEW, kind=EXPORT)
    assert tree(notes) == {"todo.txt": b"keep me"}

    save = tmp_path / "save"
    saving.write(str(save), MLP(d_in=2, hidden=[3], d_out=2), initial_weights(MLP(d_in=2, hidden=[3], d_out=2)))
    with pytest.raises(matta.SaveError, match="not a matta export"):  # a save is not an export
        write_tree(save, NEW, kind=EXPORT)
    with pytest.raises(matta.SaveError, match="exists and is not empty"):  # nor a folder of no kind
        write_tree(save, NEW)
    assert saving.is_save(str(save))

    (tmp_path / "file").write_text("x")
    with pytest.raises(matta.SaveError, match="is a file, not a folder"):
        write_tree(tmp_path / "file", NEW)
    empty = tmp_path / "empty"
    empty.mkdir()
    write_tree(empty, NEW)
    write_tree(notes, NEW, overwrite=True)
    write_tree(tmp_path / "file", NEW, overwrite=True)
    assert tree(empty) == tree(notes) == tree(tmp_path / "file") == NEW


def test_a_symlinked_target_is_refused_or_replaced_never_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "a.txt").write_text("keep me")
    link = tmp_path / "link"
    os.symlink(victim, link)
    with pytest.raises(matta.SaveError, match="symbolic link; pass overwrite=True to replace the link"):
        write_tree(link, NEW)
    write_tree(link, NEW, overwrite=True)
    assert not os.path.islink(link) and tree(link) == NEW
    assert tree(victim) == {"a.txt": b"keep me"}


def test_a_symlink_or_fifo_in_the_written_tree_is_refused(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    for plant in (lambda p: os.symlink(victim, p), os.mkfifo):
        with pytest.raises(matta.SaveError, match="plain files and folders only; 'sub/x' is neither"):
            with saving.atomic_folder(tmp_path / "out") as folder:
                os.mkdir(os.path.join(folder.path, "sub"))
                plant(os.path.join(folder.path, "sub", "x"))
        assert sorted(os.listdir(tmp_path)) == ["victim.txt"] and victim.read_text() == "keep me"


@pytest.mark.parametrize("name", ["", "/abs", "../up", "a/../b", "a//b", "a\\b", "nul\0", "."])
def test_a_written_name_is_a_relative_path_of_plain_names(tmp_path, name):
    with pytest.raises(matta.SaveError, match="relative paths of plain names"):
        with saving.atomic_folder(tmp_path / "out") as folder:
            folder.write_bytes(name, [b"x"])
    assert os.listdir(tmp_path) == []


def test_a_save_reserves_its_manifest_and_holds_plain_files_only(tmp_path):
    with pytest.raises(matta.SaveError, match="other than \\['manifest.json'\\]"):
        with saving.atomic_save(tmp_path / "s", kind=saving.FORMAT) as folder:
            folder.write_bytes("manifest.json", [b"{}"])
    with pytest.raises(matta.SaveError, match="a save holds plain files only; 'sub' in the save is not one"):
        with saving.atomic_save(tmp_path / "s", kind=saving.FORMAT) as folder:
            folder.write_bytes("sub/x", [b"x"])
    assert os.listdir(tmp_path) == []
    with saving.atomic_folder(tmp_path / "e", kind=EXPORT) as folder:  # any other folder writes its own manifest
        folder.write_json("manifest.json", {"format": EXPORT})
    assert saving.folder_kind(tmp_path / "e") == EXPORT


def test_folder_kind_reads_manifests_and_old_saves_without_following_symlinks(tmp_path):
    spec = MLP(d_in=2, hidden=[3], d_out=2)
    for kind, writer in ((saving.FORMAT, saving.write_extracted), (saving.MODEL_FORMAT, None)):
        with saving.atomic_save(tmp_path / kind.replace("/", "-"), kind=kind) as folder:
            if writer:
                writer(folder, spec, initial_weights(spec))
            else:
                folder.write_json(saving.MODEL_FILE, {"format": kind})
        assert saving.folder_kind(tmp_path / kind.replace("/", "-")) == kind
    old = tmp_path / saving.FORMAT.replace("/", "-")
    os.remove(old / "manifest.json")  # a save written before matta kept manifests
    assert saving.folder_kind(old) == saving.FORMAT and saving.is_save(str(old))
    planted = tmp_path / "planted"
    planted.mkdir()
    os.symlink(old / "spec.json", planted / "spec.json")
    (tmp_path / "m.json").write_text(json.dumps({"format": EXPORT}))
    os.symlink(tmp_path / "m.json", planted / "manifest.json")
    assert saving.folder_kind(planted) is None
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "manifest.json").write_text(json.dumps({"format": "npm/1"}))
    assert saving.folder_kind(tmp_path / "other") is None and saving.folder_kind(tmp_path / "none") is None


# ---------------------------------------------------------------------- atomic_file
def test_a_file_is_replaced_whole_and_a_failure_leaves_the_old_one(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "model.bin"
    with saving.atomic_file(path) as f:  # parent folders are created
        f.write(b"old")
    with pytest.raises(RuntimeError, match="a writer's own error"):
        with saving.atomic_file(path) as f:
            f.write(b"half")
            raise RuntimeError("a writer's own error")
    real_fsync = os.fsync

    def fsync(fd):
        raise OSError(errno.EIO, "injected failure")

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(matta.SaveError, match="injected failure.*previous save there is unchanged"):
        with saving.atomic_file(path) as f:
            f.write(b"new, never flushed")
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert path.read_bytes() == b"old" and os.listdir(path.parent) == ["model.bin"]
    with saving.atomic_file(str(path)) as f:
        f.write(b"new")
    assert path.read_bytes() == b"new" and os.listdir(path.parent) == ["model.bin"]


def test_a_symlink_at_the_path_is_replaced_never_followed_and_a_folder_is_refused(tmp_path):
    victim, link = tmp_path / "victim.txt", tmp_path / "model.bin"
    victim.write_text("keep me")
    os.symlink(victim, link)
    with saving.atomic_file(link) as f:
        f.write(b"new")
    assert not os.path.islink(link) and link.read_bytes() == b"new" and victim.read_text() == "keep me"
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "x").write_text("keep me")
    with pytest.raises(matta.SaveError, match="previous save there is unchanged"):
        with saving.atomic_file(tmp_path / "folder") as f:
            f.write(b"new")
    assert tree(tmp_path / "folder") == {"x": b"keep me"}
    assert sorted(os.listdir(tmp_path)) == ["folder", "model.bin", "victim.txt"]


def test_leftovers_of_a_killed_writer_are_removed_by_the_next_write(tmp_path):
    pid = dead_pid()
    (tmp_path / f".model.bin.matta-tmp-{pid}-0a1b2c3d").write_bytes(b"half")
    (tmp_path / f".out.matta-tmp-{pid}-0a1b2c3d").mkdir()
    (tmp_path / f".out.matta-old-{pid}-0a1b2c3d").mkdir()
    alive = tmp_path / f".out.matta-tmp-{os.getppid()}-0a1b2c3d"  # a live process's write is left alone
    alive.mkdir()
    with saving.atomic_file(tmp_path / "model.bin") as f:
        f.write(b"x")
    write_tree(tmp_path / "out", NEW)
    assert sorted(os.listdir(tmp_path)) == sorted(["model.bin", "out", alive.name])


# ---------------------------------------------------------------------- permissions
@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_files_and_folders_get_the_usual_permissions_less_the_umask(tmp_path, mask):
    spec = MLP(d_in=2, hidden=[3], d_out=2)
    with umask(mask):
        write_tree(tmp_path / "out", NEW)
        with saving.atomic_file(tmp_path / "one.bin") as f:
            f.write(b"x")
        saving.write(str(tmp_path / "save"), spec, initial_weights(spec))
        with saving.atomic_folder(tmp_path / "by-path") as folder:  # what a backend or library writes by path
            with open(os.path.join(folder.path, "w.bin"), "wb") as f:
                f.write(np.zeros(3).tobytes())
            os.mkdir(os.path.join(folder.path, "sub"))
            fd = os.open(os.path.join(folder.path, "sub", "private.bin"), os.O_WRONLY | os.O_CREAT, 0o600)  # as safetensors does
            os.close(fd)
    file_mode, folder_mode = 0o666 & ~mask, 0o777 & ~mask
    for root in ("out", "save", "by-path"):
        found = modes(tmp_path / root)
        assert found == {p: folder_mode if (tmp_path / root / p).is_dir() else file_mode for p in found}, root
    assert stat.S_IMODE(os.lstat(tmp_path / "one.bin").st_mode) == file_mode
