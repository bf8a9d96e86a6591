"""Code run as another user gets a copy it can read: the checkout may sit in a directory only its owner can
enter (a ``mktemp -d`` directory, a 0700 or 0750 home), and so may the virtual environment."""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["SYSTEM_PYTHON", "readable_copy", "system_python_ok"]

ROOT = Path(__file__).resolve().parents[2]
#: The interpreter another user can run: the venv's may live where only its owner can enter.
SYSTEM_PYTHON = "/usr/bin/python3"


def system_python_ok() -> bool:
    """Whether :data:`SYSTEM_PYTHON` exists and is 3.11 or later (it has ``tomllib``)."""
    return os.access(SYSTEM_PYTHON, os.X_OK) and subprocess.run(
        [SYSTEM_PYTHON, "-c", "import tomllib"], capture_output=True, check=False).returncode == 0


#: Installed packages the copied code imports that the system interpreter lacks (copied from this environment:
#: the system interpreter is the one the virtualenv was made from, so a compiled module loads in both).
DEPENDENCIES = ("msgspec",)


@contextlib.contextmanager
def readable_copy(*packages: str) -> Iterator[Path]:
    """A world-readable copy of the checkout's ``packages`` (``.py`` and data files, no caches) and of
    :data:`DEPENDENCIES` in a fresh directory under the system temp dir; put the yielded directory on
    ``sys.path``. Removed afterwards."""
    base = Path(tempfile.mkdtemp(prefix="gw-readable-"))
    try:
        base.chmod(0o755)
        sources = [ROOT / package for package in packages]
        sources += [Path(importlib.import_module(name).__file__ or "").parent for name in DEPENDENCIES]
        for source in sources:
            shutil.copytree(source, base / source.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        for path in base.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)
