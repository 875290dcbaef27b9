"""Strict, declarative TOML configuration.

Every section is a frozen dataclass whose fields carry an `opt(...)` spec:
bounds, allowed choices and a description (the description is also the
config reference in the README).  Loading refuses unknown keys, wrong types
and out-of-range values with a message that names ``section.key``, the value
given and what is allowed -- the operator should never have to guess.

Hardware parts (`[camera]`, `[valves]`, ...) choose a backend with ``type``;
each backend registers its own options dataclass, so ``[valves] type="mcu"``
accepts ``port`` while ``type="sim"`` refuses it.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar, get_args, get_origin

try:
    import tomllib
except ImportError:  # Python 3.10 (JetPack 6)
    import tomli as tomllib  # type: ignore[no-redef]

T = TypeVar("T")


class ConfigError(ValueError):
    """One or more configuration problems; `problems` lists them all."""

    def __init__(self, problems: list[str], source: str = "") -> None:
        self.problems = problems
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(where + "; ".join(problems))

    def report(self) -> str:
        head = f"configuration error in {self.source}" if self.source else "configuration error"
        return head + ":\n" + "\n".join(f"  - {p}" for p in self.problems)


def opt(
    default: Any,
    doc: str,
    *,
    minval: float | None = None,
    maxval: float | None = None,
    above: float | None = None,
    choices: tuple[Any, ...] | None = None,
) -> Any:
    """A config option: its default, a description and its bounds."""
    meta = {"doc": doc, "minval": minval, "maxval": maxval, "above": above, "choices": choices}
    if isinstance(default, (dict, list)):
        factory = (lambda d=default: type(d)(d))  # noqa: E731 -- fresh copy per instance
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is not None:
        return getattr(origin, "__name__", str(tp))
    return {float: "number", int: "integer", str: "string", bool: "true/false"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, key: str) -> tuple[Any, str | None]:
    """Check `value` against the annotated type; return (value, error)."""
    origin = get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        for arg in get_args(tp):
            if arg is type(None) and value is None:
                return None, None
            got, err = _coerce(value, arg, key)
            if err is None:
                return got, None
        return value, f"{key} = {value!r} has the wrong type: expected {_type_name(tp)}"
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif tp is str:
        ok = isinstance(value, str)
    elif origin is dict or tp is dict:
        ok = isinstance(value, dict)
    elif origin in (list, tuple) or tp in (list, tuple):
        ok = isinstance(value, list)
        if ok and origin is tuple:
            inner = get_args(tp)[0]
            items = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
            bad = [e for _, e in items if e]
            if bad:
                return value, bad[0]
            value = tuple(v for v, _ in items)
    else:
        ok = True
    if not ok:
        return value, f"{key} = {value!r} has the wrong type: expected {_type_name(tp)}"
    return value, None


def _check_bounds(value: Any, meta: typing.Mapping[str, Any], key: str) -> str | None:
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        return f"{key} = {value!r} is not allowed: choose one of {allowed}"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, float) and not math.isfinite(value):
            return f"{key} = {value!r} must be a finite number"
        lo, hi, above = meta.get("minval"), meta.get("maxval"), meta.get("above")
        if lo is not None and value < lo:
            return f"{key} = {value!r} is too small: must be >= {lo}" + _range(lo, hi)
        if hi is not None and value > hi:
            return f"{key} = {value!r} is too large: must be <= {hi}" + _range(lo, hi)
        if above is not None and value <= above:
            return f"{key} = {value!r} must be > {above}"
    return None


def _range(lo: float | None, hi: float | None) -> str:
    return f" (allowed range {lo} .. {hi})" if lo is not None and hi is not None else ""


def build(cls: type[T], raw: Any, section: str, problems: list[str]) -> T:
    """Build dataclass `cls` from a TOML table, appending problems, never raising."""
    if not isinstance(raw, dict):
        problems.append(f"[{section}] must be a table, got {raw!r}")
        return typing.cast(T, None)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key in raw:
        if key not in fields:
            valid = ", ".join(sorted(fields)) or "(none)"
            problems.append(f"{section}.{key}: unknown option; valid options of [{section}] are: {valid}")
    values: dict[str, Any] = {}
    for name, f in fields.items():
        if name not in raw:
            continue
        key = f"{section}.{name}"
        value, err = _coerce(raw[name], hints[name], key)
        err = err or _check_bounds(value, f.metadata, key)
        if err:
            problems.append(err)
        else:
            values[name] = value
    try:
        return cls(**values)
    except ConfigError as exc:  # cross-field checks in __post_init__
        problems.extend(exc.problems)
        # The caller raises on any problem, so this placeholder never escapes.
        return typing.cast(T, None)


def check_pins(section: str, pins: dict[str, Any], keys: Sequence[str], hi: int, camera_pin: int = -1) -> list[str]:
    """<section>.pins: one distinct output per key (a jet bin, a lighting mode), none of them
    the camera trigger's (camera_pin, when >= 0)."""
    problems = []
    if set(pins) != set(keys):
        problems.append(f"{section}.pins = {pins!r}: needs exactly the keys {', '.join(keys)}")
    for k, v in pins.items():
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= hi:
            problems.append(f"{section}.pins.{k} = {v!r}: must be an integer in [0, {hi}]")
    used = [str(v) for v in pins.values()] + ([str(camera_pin)] if camera_pin >= 0 else [])
    if len(set(used)) != len(used):
        camera = f", {section}.camera_pin = {camera_pin}" if camera_pin >= 0 else ""
        problems.append(f"{section}.pins = {pins!r}{camera}: every output needs its own pin")
    return problems


def load_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError([f"file not found: {path}"], str(path)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"not valid TOML: {exc}"], str(path)) from None
    except OSError as exc:
        raise ConfigError([f"cannot read: {exc}"], str(path)) from None


def describe(cls: type, section: str) -> list[str]:
    """Reference lines `section.key (default): description [bounds]` for docs."""
    lines = []
    for f in dataclasses.fields(cls):
        meta = f.metadata
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc,operator]
        bounds = []
        if meta.get("choices"):
            bounds.append("one of " + ", ".join(repr(c) for c in meta["choices"]))
        if meta.get("minval") is not None:
            bounds.append(f">= {meta['minval']}")
        if meta.get("above") is not None:
            bounds.append(f"> {meta['above']}")
        if meta.get("maxval") is not None:
            bounds.append(f"<= {meta['maxval']}")
        extra = f" [{'; '.join(bounds)}]" if bounds else ""
        lines.append(f"`{section}.{f.name}` (default `{default!r}`): {meta.get('doc', '')}{extra}")
    return lines


def check_value(value: Any, tp: Any, meta: typing.Mapping[str, Any], key: str) -> tuple[Any, str | None]:
    """One value against its annotated type and its `opt` bounds, for files read outside
    `build` (a recorded session's metadata); (the value, converted, or the problem)."""
    value, err = _coerce(value, tp, key)
    return value, err or _check_bounds(value, meta, key)
