"""Frozen dataclasses to and from JSON: the one reader and writer of ``plans.json``, ``fingerprint.json`` and the
preprocessed cases' ``CASE.json``.

:func:`from_plain` builds a dataclass from parsed JSON by its type annotations and names the field of every
unknown, missing or wrongly typed value (``configurations.3d_resunet.batch_size: expected int, got 'two'``);
:func:`to_plain` turns it back into JSON-ready values. Each file keeps a ``schema_version`` of its own, checked by
the class that reads it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from autoseg.io.files import read_json, write_json

T = TypeVar("T")


def to_plain(value: Any) -> Any:
    """Dataclasses to dicts (in field order), tuples to lists, numpy scalars to Python numbers."""
    if dataclasses.is_dataclass(value):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def write_typed(value: Any, path: str | Path) -> None:
    """Write the dataclass ``value`` as JSON atomically, ``schema_version`` first."""
    plain = to_plain(value)
    version = {"schema_version": plain.pop("schema_version")} if "schema_version" in plain else {}
    write_json({**version, **plain}, path)


def read_typed(
    kind: type[T],
    path: str | Path,
    error: type[Exception],
    missing: str,
    hint: str = "",
    upgrade: Callable[[Any], Any] | None = None,
    version: int | None = None,
) -> T:
    """Read ``path`` as the dataclass ``kind``.

    Args:
        kind: the dataclass to build.
        path: the JSON file.
        error: the exception to raise; its message starts with ``path``.
        missing: what to say when there is no file (e.g. ``no plans found; run autoseg_plan first``).
        hint: appended to the message of an unreadable file (e.g. what to re-run).
        upgrade: turns the parsed JSON of an older version into the current one before it is validated.
        version: the ``schema_version`` the file must have (after ``upgrade``); None: not checked here.

    Raises:
        error: no file, invalid JSON, unknown or missing fields, wrong types; the message names the field.
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: {missing}")
    try:
        plain = read_json(path)
        value = from_plain(kind, upgrade(plain) if upgrade is not None else plain, "")
    except (TypeError, ValueError) as problem:
        raise error(f"{path}: {problem}{hint}") from None
    if version is not None and value.schema_version != version:
        raise error(
            f"{path}: schema_version: this autoseg reads version {version}, the file has {value.schema_version}{hint}"
        )
    return value


def from_plain(kind: Any, value: Any, where: str) -> Any:
    """Build ``kind`` (a dataclass or a typing annotation) from JSON ``value``; errors name the field.

    A union tries its types in order (``int | float`` keeps ``3`` an int and reads ``3.5`` as a float).

    Raises:
        ValueError: unknown or missing fields, a tuple of the wrong length.
        TypeError: a value of the wrong type.
    """
    origin = typing.get_origin(kind)
    if dataclasses.is_dataclass(kind):
        return _dataclass(kind, value, where)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        failures = []
        for option in (o for o in options if o is not type(None)):
            try:
                return from_plain(option, value, where)
            except (TypeError, ValueError) as error:
                failures.append(error)
        raise failures[0]
    if origin is tuple:
        if not isinstance(value, list):
            raise TypeError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(kind)
        items = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
        if len(items) != len(value):
            raise ValueError(f"{where}: expected {len(items)} values, got {len(value)}")
        return tuple(from_plain(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(items, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise TypeError(f"{where}: expected an object")
        _, value_kind = typing.get_args(kind)
        return {str(k): from_plain(value_kind, v, f"{where}.{k}") for k, v in value.items()}
    return _scalar(kind, value, where)


def _dataclass(kind: Any, value: Any, where: str) -> Any:
    label = where or "top level"
    if not isinstance(value, dict):
        raise TypeError(f"{label}: expected an object")
    hints = typing.get_type_hints(kind)
    fields = dataclasses.fields(kind)
    unknown = sorted(set(value) - {f.name for f in fields})
    if unknown:
        raise ValueError(f"{label}: unknown field(s) {unknown}")
    missing = [
        f.name
        for f in fields
        if f.name not in value and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ValueError(f"{label}: missing field(s) {missing}")
    return kind(**{k: from_plain(hints[k], v, f"{where}.{k}" if where else k) for k, v in value.items()})


def _scalar(kind: type, value: Any, where: str) -> Any:
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind in (str, bool) and isinstance(value, kind):
        return value
    if kind is Any:
        return value
    raise TypeError(f"{where}: expected {kind.__name__}, got {value!r}")
