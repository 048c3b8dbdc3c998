"""Checks every command runs before it spends the user's time.

* :func:`check_writable`: an output file or folder can be written (the path itself need not
  exist yet). Commands call it first thing, so an unwritable ``--out`` is reported in one
  line before any data is read or any network is trained, instead of as a traceback after.
* :func:`require_extra`: the optional packages a command needs are installed; otherwise the
  error names the ``pip install`` line. The library (``dualflow``) needs only torch, numpy and
  tqdm; the experiments need the extras in :data:`EXTRAS` (declared in ``pyproject.toml``
  under ``[project.optional-dependencies]``; ``tests/test_io.py`` keeps the two in step).
"""

from __future__ import annotations

import importlib
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

__all__ = ["EXTRAS", "MissingExtraError", "NotWritableError", "check_writable", "require_extra"]


class NotWritableError(ValueError):
    """An output path cannot be written. A ``ValueError``, so the CLI prints it as one line."""


class MissingExtraError(ImportError):
    """An optional dependency of an experiment command is not installed."""


#: extra (``pip install 'dualflow[<extra>]'``) -> {import name: requirement} of what the
#: experiments import from it. Add an extra here and in ``pyproject.toml`` together.
EXTRAS: dict[str, dict[str, str]] = {
    "plot": {"matplotlib": "matplotlib"},
    "experiments": {"matplotlib": "matplotlib", "sklearn": "scikit-learn"},
    "augment": {"kornia": "kornia"},
}


def require_extra(extra: str, modules: Iterable[str] | None = None, *, purpose: str = "") -> None:
    """Raise :class:`MissingExtraError` naming the ``pip install`` line if a package is missing.

    Args:
        extra: key of :data:`EXTRAS`.
        modules: import names to check (default: all of the extra's).
        purpose: what needs them, for the message (e.g. ``"dualflow quickstart"``).
    """
    if extra not in EXTRAS:
        raise KeyError(f"unknown extra {extra!r}; known: {', '.join(EXTRAS)}")
    names = list(EXTRAS[extra]) if modules is None else list(modules)
    missing = []
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(EXTRAS[extra].get(name, name))
    if missing:
        who = f"{purpose} needs" if purpose else "this needs"
        raise MissingExtraError(
            f"{who} {', '.join(missing)}, which is not installed: run  pip install 'dualflow[{extra}]'  "
            f"(from a checkout: pip install -e '.[{extra}]')"
        )


def _probe_dir(folder: Path) -> str | None:
    """``None`` if a file can be created in the existing folder ``folder``, else the reason."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".dualflow-write-check-", dir=folder)
    except OSError as err:
        return err.strerror or str(err)
    os.close(fd)
    os.unlink(tmp)
    return None


def check_writable(
    path: str | os.PathLike[str] | None, kind: Literal["file", "dir"] = "file", *, option: str = "output"
) -> None:
    """Raise :class:`NotWritableError` unless ``path`` can be written as a file / folder.

    Nothing is created or modified: for a path that does not exist yet, the nearest existing
    ancestor must be a folder in which a file can be created (checked by creating and removing
    a temporary file, which is honest also for root, read-only file systems and ACLs); the
    missing folders below it are created later by the command. An existing file is opened for
    appending (not truncated); an existing folder is probed like an ancestor.

    Args:
        path: the output; ``None`` (no output requested) passes.
        kind: ``"file"`` (e.g. ``--out results.json``) or ``"dir"`` (e.g. ``--out-dir``).
        option: the command-line option, for the message.
    """
    if path is None:
        return
    p = Path(path).expanduser()

    def fail(reason: str) -> None:
        raise NotWritableError(f"cannot write {option} {os.fspath(path)}: {reason}")

    if p.exists():
        if kind == "file":
            if p.is_dir():
                fail("it is a folder, not a file")
            try:
                with open(p, "a"):
                    pass
            except OSError as err:
                fail(err.strerror or str(err))
            return
        if not p.is_dir():
            fail("it exists and is not a folder")
        reason = _probe_dir(p)
        if reason:
            fail(f"{reason} (cannot create files in it)")
        return
    ancestor = p.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        fail(f"{ancestor} is a file, not a folder")
    reason = _probe_dir(ancestor)
    if reason:
        fail(f"cannot create files in {ancestor} ({reason})")
