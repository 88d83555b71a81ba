"""mkdocs hook: lays out the package as it installs, so mkdocstrings can read it statically.

setuptools installs the repository's ``backends/`` folder as ``matta.backends``
(``package-dir`` in pyproject.toml). griffe, which mkdocstrings uses to read the
source, follows an editable install's top-level mapping (``matta``) but not a
mapped subpackage, so it cannot find ``matta.backends.torch``. This hook mirrors
the installed layout under ``build/apidocs/matta/`` (real folders, symlinked
``.py`` files) and mkdocs.yml points the Python handler's ``paths`` at
``build/apidocs``. No source is copied or changed.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from mkdocs.plugins import event_priority


def layout(root: Path) -> Path:
    """Mirrors ``matta/`` and ``backends/`` as ``root/build/apidocs/matta[/backends]``; returns ``build/apidocs``.

    Folders are real (griffe does not walk into symlinked folders); every ``.py``
    file is a symlink to the source, so the pages always show the current code.
    """
    out = root / "build" / "apidocs"
    package = out / "matta"
    if package.exists():
        shutil.rmtree(package)
    for source, target in ((root / "matta", package), (root / "backends", package / "backends")):
        for folder, dirs, files in os.walk(source):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            here = target / Path(folder).relative_to(source)
            here.mkdir(parents=True, exist_ok=True)
            for name in files:
                if name.endswith(".py"):
                    (here / name).symlink_to(Path(folder, name).resolve())
    return out


@event_priority(100)  # before mkdocstrings' own on_config, which sets up the handler and its search paths
def on_config(config: Any) -> Any:
    """mkdocs event: build the layout before mkdocstrings reads any source."""
    layout(Path(config["config_file_path"]).resolve().parent)
    return config
