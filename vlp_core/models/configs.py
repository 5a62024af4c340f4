"""Typed configs as dataclasses with presets, built from nested dicts of overrides (YAML / ``--set``)."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, ClassVar, TypeVar, Union

__all__ = ["PresetConfig", "config_from_dict"]

T = TypeVar("T", bound="PresetConfig")


def config_from_dict(base: Any, overrides: dict[str, Any]) -> Any:
    """A copy of dataclass ``base`` with ``overrides`` applied; nested dataclass fields take nested dicts.

    A nested dict may carry ``"preset"`` when its dataclass has a ``preset`` classmethod: the preset then
    replaces the base before the other keys apply. A ``"kind"`` / ``"name"`` key equal to the class's own
    registry name is accepted (configs are written with it). Unknown keys raise ``KeyError`` (typos must not
    pass silently). The result is rebuilt through the constructor, so ``__post_init__`` validation runs.
    """
    overrides = dict(overrides)
    if "preset" in overrides:
        if not hasattr(type(base), "preset"):
            raise KeyError(f"{type(base).__name__} has no presets")
        base = type(base).preset(overrides.pop("preset"))
    for tag in ("kind", "name"):
        own = getattr(type(base), "registry_" + tag, None)
        if own is not None and tag in overrides:
            if overrides[tag] != own:
                raise ValueError(f"{type(base).__name__} is {tag} {own!r}, not {overrides[tag]!r}")
            overrides.pop(tag)
    names = {f.name for f in dataclasses.fields(base)}
    values = {name: getattr(base, name) for name in names}
    for key, value in overrides.items():
        if key not in names:
            raise KeyError(f"{type(base).__name__} has no field {key!r} (fields: {sorted(names)})")
        current = values[key]
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            values[key] = config_from_dict(current, value)
        else:
            values[key] = value
    hints = typing.get_type_hints(type(base))
    for key in overrides:
        _check_type(type(base).__name__, key, values[key], hints.get(key))
    return type(base)(**values)


def _check_type(owner: str, name: str, value: Any, hint: Any) -> None:
    """Raise ``ValueError`` when ``value`` does not fit a plain field type (int, float, bool, str, their
    optionals, lists and dicts); other annotations (nested dataclasses) are checked by their own class."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (Union, types.UnionType) else (hint,)
    plain = {int, float, bool, str, type(None), list, dict}
    kinds = [typing.get_origin(o) or o for o in options]
    if not all(k in plain for k in kinds):
        return
    ok = any(
        (k is float and isinstance(value, int | float) and not isinstance(value, bool))
        or (k is int and isinstance(value, int) and not isinstance(value, bool))
        or (k not in (int, float) and isinstance(value, k))
        for k in kinds
    )
    if not ok:
        want = " | ".join(getattr(k, "__name__", str(k)) for k in kinds)
        raise ValueError(f"{owner}.{name} must be {want}, got {value!r} ({type(value).__name__})")


class PresetConfig:
    """Mixin for config dataclasses: ``preset(name)``, ``from_dict`` / ``to_dict`` round trips.

    Subclasses define :attr:`PRESETS` (name -> zero-argument factory of the config) and set
    ``registry_kind`` (backbones) or ``registry_name`` (recipes), written into :meth:`to_dict`.
    """

    PRESETS: ClassVar[dict[str, Any]] = {}

    @classmethod
    def preset(cls: type[T], name: str) -> T:
        try:
            factory = cls.PRESETS[name]
        except KeyError:
            raise KeyError(f"unknown {cls.__name__} preset {name!r} (known: {sorted(cls.PRESETS)})") from None
        return factory()

    @classmethod
    def from_dict(cls: type[T], d: dict[str, Any]) -> T:
        """Build from a (nested) dict: ``{"preset": "tiny", "vision": {"image_size": 96}}``; without
        ``"preset"`` the overrides apply to the class defaults. ``from_dict(c.to_dict()) == c``."""
        return config_from_dict(cls(), d)

    def to_dict(self) -> dict[str, Any]:
        """Every field, nested dataclasses as dicts (what a run records beside its outputs)."""
        out = dataclasses.asdict(self)  # type: ignore[call-overload]
        for tag in ("kind", "name"):
            own = getattr(type(self), "registry_" + tag, None)
            if own is not None:
                out = {tag: own, **out}
        return out
