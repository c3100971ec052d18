"""Per-method options: a small dataclass registered with the methods that read it (llm-compressor's modifiers carry
their own fields the same way), instead of fields of the shared :class:`~fusegpt.config.CompressConfig`.

A group has a prefix (``laco``, ``heal``, ``global``, ``search``); each field ``f`` becomes the flag ``--PREFIX-F``
(``--laco-layers``) and the flat config key ``PREFIX_F`` (``laco_layers:`` in a YAML file), both generated from the
dataclass. The config keeps only the values that were set, by group (``config.options = {"laco": {"layers": 2}}``);
:func:`resolve` overlays them on the defaults and validates them. Fields are declared with :func:`option`::

    @dataclass
    class LacoOptions:
        layers: int = option(4, "consecutive layers merged into one (C)", minimum=2)

Groups are registered by the methods modules (``register_method(..., options=...)``); this ground-layer module knows
none of them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any, Callable, Iterator

__all__ = ["OptionSpec", "option", "register_options", "option_groups", "option_specs", "resolve", "split_flat",
           "validate_options"]

_GROUPS: dict[str, type] = {}


def option(default: Any, help: str, *, choices: Callable[[], list[str]] | list[str] | None = None,
           minimum: float | None = None, maximum: float | None = None, key: str | None = None) -> Any:
    """A dataclass field with what the CLI and validation need: ``help``, accepted ``choices`` (a list, or a callable
    returning one, for names that come from a registry), bounds, and ``key`` when the flag's suffix differs from the
    attribute name (``--heal-from`` for the attribute ``base``)."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "minimum": minimum,
                                                        "maximum": maximum, "key": key})


@dataclass(frozen=True)
class OptionSpec:
    """One option as the CLI and the config see it."""

    group: str
    name: str  # attribute of the dataclass
    key: str  # suffix of the flag and the flat key
    default: Any
    type: type
    help: str
    choices: Callable[[], list[str]] | list[str] | None
    minimum: float | None
    maximum: float | None

    @property
    def flag(self) -> str:
        return f"--{self.group}-{self.key}".replace("_", "-")

    @property
    def flat_key(self) -> str:
        return f"{self.group}_{self.key}".replace("-", "_")

    def allowed(self) -> list[str] | None:
        c = self.choices
        return list(c()) if callable(c) else (list(c) if c is not None else None)


def register_options(group: str, cls: type) -> type:
    """Register an options dataclass under ``group`` (once; several methods may read the same group)."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"options of {group!r} must be a dataclass, got {cls!r}")
    if group in _GROUPS and _GROUPS[group] is not cls:
        raise ValueError(f"options group {group!r} registered twice with different classes")
    for f in fields(cls):
        if "help" not in f.metadata:
            raise ValueError(f"option {group}.{f.name} needs option(default, help)")
    _GROUPS[group] = cls
    return cls


def option_groups() -> dict[str, type]:
    """Every registered group (importing the methods registers theirs)."""
    from . import methods  # noqa: F401  (registers the groups)

    return dict(_GROUPS)


def option_specs() -> Iterator[OptionSpec]:
    for group, cls in sorted(option_groups().items()):
        for f in fields(cls):
            m = f.metadata
            yield OptionSpec(group, f.name, m.get("key") or f.name, f.default, type(f.default), m["help"],
                             m.get("choices"), m.get("minimum"), m.get("maximum"))


def split_flat(data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Separate flat option keys (``laco_layers``) from the other config keys -> (others, {group: {name: value}})."""
    by_key = {s.flat_key: s for s in option_specs()}
    rest, opts = {}, {}
    for k, v in data.items():
        s = by_key.get(k.replace("-", "_"))
        if s is None:
            rest[k] = v
        else:
            opts.setdefault(s.group, {})[s.name] = v
    return rest, opts


def _error(msg: str) -> Exception:
    from .config import ConfigError

    return ConfigError(msg)


def validate_options(options: dict[str, dict[str, Any]]) -> None:
    """Every group and option known, every value of the right type, in its choices and bounds (ConfigError naming
    the flag otherwise)."""
    groups = option_groups()
    specs = {(s.group, s.name): s for s in option_specs()}
    for group, values in options.items():
        if group not in groups:
            raise _error(f"unknown method options {group!r}; known: {', '.join(sorted(groups))}")
        if not isinstance(values, dict):
            raise _error(f"method options {group!r} must be a mapping of option names to values")
        for name, v in values.items():
            s = specs.get((group, name))
            if s is None:
                known = [x.flag for x in specs.values() if x.group == group]
                raise _error(f"unknown option {name!r} of {group!r}; known: {', '.join(known)}")
            ok = isinstance(v, s.type) and not (s.type is not bool and isinstance(v, bool))
            if s.type is float and isinstance(v, int) and not isinstance(v, bool):
                ok = True
            if not ok:
                raise _error(f"{s.flag} takes a {s.type.__name__}, got {v!r}")
            allowed = s.allowed()
            if allowed is not None and v not in allowed:
                raise _error(f"{s.flag} must be one of {allowed}, got {v!r}")
            if s.minimum is not None and v < s.minimum:
                raise _error(f"{s.flag} must be >= {s.minimum}, got {v}")
            if s.maximum is not None and v > s.maximum:
                raise _error(f"{s.flag} must be <= {s.maximum}, got {v}")


def resolve(options: dict[str, dict[str, Any]], group: str):
    """The options of ``group``: its dataclass with the set values over the defaults (validated)."""
    groups = option_groups()
    if group not in groups:
        raise _error(f"unknown method options {group!r}; known: {', '.join(sorted(groups))}")
    values = dict(options.get(group, {}))
    validate_options({group: values})
    floats = {s.name for s in option_specs() if s.group == group and s.type is float}
    return groups[group](**{k: float(v) if k in floats else v for k, v in values.items()})
