"""Plain-JSON views of settings and summaries (dataclasses, tuples, paths), shared by the pipeline and the Hub push."""

from __future__ import annotations

from dataclasses import fields, is_dataclass
from typing import Any


def jsonable(value: Any) -> Any:
    """Return ``value`` as JSON-serialisable data; anything unknown becomes its ``str``."""
    if is_dataclass(value):
        return {f.name: jsonable(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)
