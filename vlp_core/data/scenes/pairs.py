"""``scene-pairs`` (NLVR2-shaped): two scenes and a true / false statement about them."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from vlp_core.data.examples import TaskExample
from vlp_core.data.scenes.composition import (
    _KINDS,
    _MAX_TRIES,
    _VOCAB,
    Desc,
    ObjectSpec,
    SceneConfig,
    _block_slot,
    _draw,
    _key,
    _meta_scenes,
    _Objs,
    _rng,
    compose_scene,
)
from vlp_core.data.scenes.sprites import COLORS, SHAPES, SpriteBanks, _part, sprite_banks

__all__ = ["PAIR_FAMILIES", "PAIR_LEVELS", "PAIR_TASKS", "PairLevel", "generate_pairs"]


# --------------------------------------------------------------------------- scene-pairs (NLVR2-shaped)

PAIR_FAMILIES = ("exist", "both", "exactly_one", "neither", "more", "same_count", "count")


@dataclass(frozen=True)
class PairLevel:
    """How hard a ``scene-pairs`` construction is: the statement ``families``, the things existence
    statements name (``vocab``) and the objects per scene (``objects``, inclusive)."""

    families: tuple[str, ...]
    vocab: tuple[Desc, ...]
    objects: tuple[int, int]


#: ``full`` (task ``scene-pairs``): every family, things named: coloured shapes, shapes, a colour's shapes,
#: clip-art nouns; 2-4 objects a scene. ``easy`` (task ``scene-pairs-easy``, built on request): existence
#: only (exist / both / exactly one / neither) of a shape or a colour's shapes, 1-2 objects a scene -- a
#: probe of whether a model learns to check a statement against an image at all.
PAIR_LEVELS = {
    "easy": PairLevel(
        ("exist", "both", "exactly_one", "neither"),
        tuple(Desc("shape", s) for s in SHAPES) + tuple(Desc("shape", None, c) for c in COLORS),
        (1, 2),
    ),
    "full": PairLevel(PAIR_FAMILIES, _VOCAB, (2, 4)),
}
#: the task name of each level (also the examples' seed domain).
PAIR_TASKS = {"full": "scene-pairs", "easy": "scene-pairs-easy"}
#: counts a statement may name, per kind: only counts a scene can have and miss (scenes have 2-4 objects).
_COUNTS = {Desc(): (2, 3, 4), Desc("shape"): (1, 2, 3), Desc("clipart"): (1, 2, 3)}


@dataclass(frozen=True)
class _Statement:
    """A statement template instance: its family, text, truth function and the thing it names (if any)."""

    family: str
    text: str
    truth: Callable[..., bool]
    desc: Desc | None = None


def _has(objs: _Objs, x: Desc) -> bool:
    return x.count(objs) > 0


@functools.cache
def _pair_space(level: str) -> dict[str, tuple[_Statement, ...]]:
    """Every statement of each family of ``level``; ``truth(left, right)``."""
    lv = PAIR_LEVELS[level]
    sides = ("left", "right")

    def pick(side: str, left: _Objs, right: _Objs) -> tuple[_Objs, _Objs]:
        return (left, right) if side == "left" else (right, left)

    space: dict[str, list[_Statement]] = {f: [] for f in PAIR_FAMILIES}
    for x in lv.vocab:
        for s in sides:
            space["exist"].append(
                _Statement(
                    "exist",
                    f"The {s} image contains {x.indef}.",
                    lambda lt, rt, x=x, s=s: _has(pick(s, lt, rt)[0], x),
                    x,
                )
            )
        space["both"].append(
            _Statement(
                "both", f"Both images contain {x.indef}.", lambda lt, rt, x=x: _has(lt, x) and _has(rt, x), x
            )
        )
        space["exactly_one"].append(
            _Statement(
                "exactly_one",
                f"Exactly one image contains {x.indef}.",
                lambda lt, rt, x=x: _has(lt, x) != _has(rt, x),
                x,
            )
        )
        space["neither"].append(
            _Statement(
                "neither",
                f"Neither image contains {x.indef}.",
                lambda lt, rt, x=x: not _has(lt, x) and not _has(rt, x),
                x,
            )
        )
    for k in _KINDS:
        for s in sides:
            other = "right" if s == "left" else "left"
            space["more"].append(
                _Statement(
                    "more",
                    f"There are more {k.plural} in the {s} image than in the {other} image.",
                    lambda lt, rt, k=k, s=s: k.count(pick(s, lt, rt)[0]) > k.count(pick(s, lt, rt)[1]),
                )
            )
            for n in _COUNTS[k]:
                space["count"].append(
                    _Statement(
                        "count",
                        f"The {s} image has exactly {k.number(n)}.",
                        lambda lt, rt, k=k, s=s, n=n: k.count(pick(s, lt, rt)[0]) == n,
                    )
                )
        space["same_count"].append(
            _Statement(
                "same_count",
                f"Both images contain the same number of {k.plural}.",
                lambda lt, rt, k=k: k.count(lt) == k.count(rt),
            )
        )
    return {f: tuple(space[f]) for f in lv.families}


def _mention_specs(
    rng: np.random.Generator, banks: SpriteBanks, cfg: SceneConfig, desc: Desc | None
) -> list[ObjectSpec] | None:
    """Random object specs, one of them made to match ``desc`` with probability 0.5 (so statements about a
    thing are true or false about as often whatever the thing); ``None`` (all random) without ``desc``."""
    if desc is None or rng.random() < 0.5:
        return None
    specs = [ObjectSpec()] * int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    specs[int(rng.integers(len(specs)))] = ObjectSpec(desc.kind, desc.name, desc.color)
    return specs


def generate_pairs(
    split: str,
    index: int,
    seed: int = 0,
    *,
    clipart_root: str | Path | None = None,
    level: str = "full",
) -> tuple[list[TaskExample], dict[str, Image.Image]]:
    """NLVR2-shaped: two scenes (left, right) and a statement, ``label`` ``"true"`` / ``"false"``, exactly
    balanced over every aligned block of 2 examples. ``level`` (:data:`PAIR_LEVELS`) sets the families, the
    things named and the objects a scene: ``full`` 2-4 objects and every family below; ``easy`` 1-2 objects,
    existence of a shape or a colour's shapes.

    Families: ``exist`` "The left image contains a red circle.", ``both`` "Both images contain a
    triangle.", ``exactly_one`` "Exactly one image contains an animal.", ``neither`` "Neither image contains
    a blue shape.", ``more`` "There are more shapes in the right image than in the left image.",
    ``same_count`` "Both images contain the same number of objects.", ``count`` "The left image has exactly
    two objects." (things: a coloured shape, a shape, a colour's shapes, a clip-art noun; counts only those
    a scene can have or miss).

    Construction: the truth value is drawn first (block-balanced), then the statement, *independently of
    it* (a family uniformly, then a statement uniformly), then pairs of scenes until the statement has that
    value for them (each scene includes the named thing with probability 0.5); a new statement after 100
    pairs. So every statement is as likely under ``true`` as under ``false`` and the text alone says nothing
    about the label; the images decide it."""
    if level not in PAIR_LEVELS:
        raise ValueError(f"scene-pairs level {level!r} not one of {sorted(PAIR_LEVELS)}")
    task = PAIR_TASKS[level]
    lv = PAIR_LEVELS[level]
    rng = _rng(seed, task, split, index)
    want = _block_slot(seed, task, split, index, (True, False))
    banks = sprite_banks(_part(split), clipart_root)
    cfg = SceneConfig(min_objects=lv.objects[0], max_objects=lv.objects[1])
    space = _pair_space(level)
    for _ in range(_MAX_TRIES // 20):
        stmt = _draw(rng, space)
        for _ in range(100):
            left = compose_scene(rng, banks, cfg, _mention_specs(rng, banks, cfg, stmt.desc))
            right = compose_scene(rng, banks, cfg, _mention_specs(rng, banks, cfg, stmt.desc))
            if stmt.truth(left.objects, right.objects) == want:
                break
        else:
            continue
        break
    else:
        raise RuntimeError(f"{task}: no statement for example {index}")
    key = _key(seed, task, split, index)
    names = (f"{task}/{split}/{key}-left.png", f"{task}/{split}/{key}-right.png")
    ex = TaskExample(
        task=task,
        split=split,
        example_id=f"{split}-{index:06d}",
        images=names,
        text=stmt.text,
        label="true" if want else "false",
        meta={"family": stmt.family, "scene_key": key, "scenes": _meta_scenes(left, right)},
    )
    return [ex], {names[0]: left.image, names[1]: right.image}
