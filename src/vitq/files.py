"""Safe outputs: every file or folder vitq writes is checked before the work and written whole or not at all.

    check_file_output(path, overwrite=False, what="--json")      # before any work: refuses a folder, an existing
                                                                  # file (without overwrite), an unwritable place
    with atomic_file(path) as partial:                           # write ``partial``; it becomes ``path`` at the
        partial.write_text(...)                                  # end (os.replace), or is removed on any error

An interrupt, a full disk or a crash therefore leaves the previous output (or none), never a half-written
one. Temporary siblings are hidden (``.name.<random>.partial``) and removed when the write fails.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from vitq.errors import VitqError


def _writable_parent(path: Path, what: str) -> None:
    """The nearest existing ancestor of ``path`` must be a folder this process can create entries in."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise VitqError(f"{what} {path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise VitqError(f"{what} {path}: cannot write in {parent} (permission denied)")


def check_file_output(path: str | Path, *, overwrite: bool, what: str) -> Path:
    """``path`` as a file output: not a folder, not an existing file unless ``overwrite``, in a writable place.
    ``what`` names the option in the error (``--json``)."""
    path = Path(path)
    if path.is_dir():
        raise VitqError(f"{what} {path} is a folder; give a file path")
    if path.exists() and not overwrite:
        raise VitqError(f"{what} {path} already exists; pass --overwrite to replace it")
    _writable_parent(path, what)
    return path


def check_folder_output(path: str | Path, *, overwrite: bool, what: str) -> Path:
    """``path`` as a folder output: not a file, not a non-empty folder unless ``overwrite``, in a writable place."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise VitqError(f"{what} {path} is a file; give a folder path")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise VitqError(f"{what} {path} already exists and is not empty; pass --overwrite to replace it")
    _writable_parent(path, what)
    return path


def _sibling(path: Path, tag: str) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.{tag}")


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """A temporary sibling of ``path`` to write; moved onto ``path`` when the block ends, removed if it raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = _sibling(path, "partial")
    try:
        yield partial
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """A temporary sibling folder of ``path`` to fill; it replaces ``path`` (and whatever was there) when the
    block ends, and is removed if the block raises, leaving ``path`` as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = _sibling(path, "partial")
    partial.mkdir()
    try:
        yield partial
        if path.is_dir() and any(path.iterdir()):
            old = _sibling(path, "old")
            os.replace(path, old)
            os.replace(partial, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(partial, path)  # over an empty folder, or onto nothing
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def write_safetensors(path: str | Path, tensors: dict, metadata: dict[str, str] | None = None) -> Path:
    """Write ``tensors`` (and string ``metadata``) as a safetensors file at ``path`` atomically; a failed write
    (a full disk, a file-size limit) is one readable error."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    path = Path(path)
    try:
        with atomic_file(path) as partial:
            save_file(tensors, str(partial), metadata=metadata)
    except SafetensorError as err:  # the writer's I/O errors come as its own type
        raise VitqError(f"cannot write {path}: {err}") from None
    return path


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    path = Path(path)
    with atomic_file(path) as partial:
        partial.write_text(text, encoding="utf-8")
    return path


def write_json(path: str | Path, record: Any) -> Path:
    """Write ``record`` as indented JSON to ``path`` atomically."""
    return write_text(path, json.dumps(record, indent=2) + "\n")
