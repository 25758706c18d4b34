"""Plain data (JSON, YAML) -> nested dataclasses, strictly: the one loader behind the model config and the
recipes.

:meth:`StrictLoader.build` walks a dataclass's fields, with their types resolved by
``typing.get_type_hints`` (so modules with ``from __future__ import annotations`` work):

* a key the dataclass has no field for raises, naming its path (``train.lrr``) and the allowed keys; keys the
  caller lists in ``ignored`` are dropped instead (the release writes keys that configure nothing here, and
  they are named one by one rather than accepting anything);
* a missing key takes the field's default; ``None`` for a whole section means "all defaults";
* every value must fit its field's type: nested dataclasses, ``list[T]``, ``tuple[T, ...]``, ``dict`` (its
  values are left to the owner's own checks), ``T | None`` and other unions (the first type that fits),
  ``bool`` (only true/false), ``int`` (never a bool), ``float`` (finite; an int is widened), ``str``, ``Any``.

``parse_text`` is for files people write and command-line overrides: YAML 1.1 reads ``2e-5`` as a string and
an override may arrive as text, so a number field parses a string, an int field takes a whole float and a
str field takes a number. The model config (JSON written by programs) is read without it.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class StrictLoader:
    """How one kind of file becomes dataclasses.

    Attributes:
        error: the exception raised (e.g. ``ConfigError``); every message starts with the offending key path.
        what: the kind of file named in messages ("config", "recipe").
        parse_text: accept numbers written as text, whole floats for ints and numbers for strings.
    """

    error: type[Exception] = ValueError
    what: str = "config"
    parse_text: bool = False

    def build(self, cls: type[T], data: Any, path: str = "", ignored: Iterable[str] = ()) -> T:
        """Build dataclass ``cls`` from the mapping ``data``.

        Args:
            cls: the dataclass; nested dataclass fields are built from nested mappings.
            data: a mapping of field name -> value, or ``None`` for every default.
            path: where ``data`` sits in the file, for messages (``""``: the top level).
            ignored: keys of ``data`` (at this level) dropped without a field.
        """
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise self.error(f"{path or self.what}: expected a mapping, got {data!r}")
        hints = typing.get_type_hints(cls)
        known = [f.name for f in dataclasses.fields(cls)]
        self.check_keys(data, known, path, ignored)
        kwargs = {k: self.coerce(v, hints[k], _join(path, k)) for k, v in data.items() if k in known}
        return cls(**kwargs)

    def check_keys(
        self, data: dict[str, Any], known: Iterable[str], path: str = "", ignored: Iterable[str] = ()
    ) -> None:
        """Raise naming every key of ``data`` that is neither ``known`` nor ``ignored``, and the known
        keys."""
        known = list(known)
        unknown = sorted(set(data) - set(known) - set(ignored), key=str)
        if unknown:
            where = ", ".join(_join(path, str(k)) for k in unknown)
            raise self.error(
                f"unknown {self.what} key(s): {where}; known keys{' of ' + path if path else ''}: {known}"
            )

    def coerce(self, value: Any, hint: Any, path: str) -> Any:
        """``value`` checked against (and converted to) the type ``hint``; raises naming ``path``."""
        origin, args = typing.get_origin(hint), typing.get_args(hint)
        if hint is Any:
            return value
        if origin in (typing.Union, types.UnionType):
            if value is None and type(None) in args:
                return None
            errors = []
            for arg in (a for a in args if a is not type(None)):
                try:
                    return self.coerce(value, arg, path)
                except self.error as err:
                    errors.append(str(err))
            raise self.error(errors[0] if errors else f"{path}: cannot be {value!r}")
        if dataclasses.is_dataclass(hint):
            return self.build(hint, value, path)
        if origin in (list, tuple):
            if not isinstance(value, (list, tuple)):
                raise self.error(f"{path}: expected a list, got {value!r}")
            if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
                raise self.error(f"{path}: unsupported field type {hint!r}")  # only tuple[T, ...]
            item = args[0] if args else Any
            items = [self.coerce(v, item, f"{path}.{i}") for i, v in enumerate(value)]
            return items if origin is list else tuple(items)
        if origin is dict or hint is dict:
            if not isinstance(value, dict):
                raise self.error(f"{path}: expected a mapping, got {value!r}")
            return dict(value)
        if hint is bool:
            if isinstance(value, bool):
                return value
            raise self.error(f"{path}: expected true or false, got {value!r}")
        if hint in (int, float):
            return self._number(value, hint, path)
        if hint is str:
            if isinstance(value, str):
                return value
            if self.parse_text and isinstance(value, (int, float)) and not isinstance(value, bool):
                return str(value)
            raise self.error(f"{path}: expected a string, got {value!r}")
        raise self.error(
            f"{path}: unsupported field type {hint!r}"
        )  # pragma: no cover - a field we never declare

    def _number(self, value: Any, hint: type, path: str) -> int | float:
        kind = "an integer" if hint is int else "a number"
        if self.parse_text and isinstance(value, str):
            try:
                value = float(value) if hint is float else int(value)
            except ValueError:
                raise self.error(f"{path}: expected {kind}, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(f"{path}: expected {kind}, got {value!r}")
        if hint is int and isinstance(value, float):
            if not self.parse_text:
                raise self.error(f"{path}: expected {kind}, got {value!r}")
            if not value.is_integer():
                raise self.error(f"{path}: expected a whole number, got {value!r}")
            value = int(value)
        try:
            value = hint(value)
        except OverflowError:  # an int too large for a float
            raise self.error(f"{path}: {value!r} is out of range") from None
        if hint is float and not math.isfinite(value):
            raise self.error(f"{path}: expected a finite number, got {value!r}")
        return value


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key
