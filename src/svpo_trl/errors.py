"""Errors that are the user's to fix (a path, a setting, a data file), and the path checks that raise them.

Recipes print a :class:`UsageError` as one line without a traceback (:func:`svpo_trl.cli.run_recipe`);
any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import re

__all__ = ["MissingExtraError", "PathNotFoundError", "UsageError", "looks_like_local_path", "require_path"]


class UsageError(ValueError):
    """What was asked cannot be done as asked: a missing path, a bad setting, a malformed data file.

    The message says what is wrong and where (file, key, row), so that it is enough on its own.
    """


class PathNotFoundError(UsageError, FileNotFoundError):
    """A local path given in the arguments does not exist."""


class MissingExtraError(UsageError, ImportError):
    """An optional dependency is not installed; the message names the extra that brings it."""


# A Hub repository id: "name" or "owner/name", letters, digits, '-', '_', '.'.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def looks_like_local_path(name: str) -> bool:
    """Whether ``name`` can only mean a local path, not a Hub id.

    Absolute and ``./``/``../``/``~`` paths, more than one ``/`` (``outputs/toy/sft``), characters no Hub id
    has, or ``dir/name`` whose ``dir`` is a local folder (``outputs/sft`` next to ``outputs/``).
    """
    if name.startswith(("/", "./", "../", "~", ".\\")) or name in (".", "..") or "\\" in name:
        return True
    if name.endswith("/") or not _HUB_ID.match(name):
        return True
    return "/" in name and os.path.isdir(name.split("/", 1)[0])


def require_path(name: str | None, flag: str) -> None:
    """Stop at once when ``name`` (the value of ``--flag``) is meant as a local path that does not exist.

    Without this, transformers and datasets take the name for a Hub id and retry the Hub for a minute
    before failing with "Repo id must be in the form ...", which does not name the missing folder.
    """
    if not name or os.path.exists(os.path.expanduser(name)) or not looks_like_local_path(name):
        return
    absolute = os.path.abspath(os.path.expanduser(name))
    where = "" if absolute == name else f" ({absolute})"
    raise PathNotFoundError(f"--{flag}: path does not exist: {name}{where}")
