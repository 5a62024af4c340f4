"""Typed configs as dataclasses with presets, built from nested dicts of overrides (YAML / ``--set``)."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, TypeVar

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
    return type(base)(**values)


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
