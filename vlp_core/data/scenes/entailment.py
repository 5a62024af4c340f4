"""``scene-entailment`` (SNLI-VE-shaped): a premise scene with an occluder and a hypothesis, labelled
entailment / neutral / contradiction."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from vlp_core.data.examples import ENTAILMENT_LABELS, TaskExample
from vlp_core.data.scenes.composition import (
    _KINDS,
    _MAX_TRIES,
    Desc,
    ObjectSpec,
    SceneConfig,
    SceneObject,
    _block_slot,
    _choose,
    _complete_spec,
    _draw,
    _key,
    _meta_scenes,
    _Objs,
    _rng,
    compose_scene,
)
from vlp_core.data.scenes.sprites import COLORS, NOUNS, SHAPES, SpriteBanks, _part, sprite_banks

__all__ = ["ENT_FAMILIES", "ENT_OBJECTS", "entailment_label", "generate_entailment"]


# --------------------------------------------------------------------------- scene-entailment (SNLI-VE)

ENT_FAMILIES = ("at_least", "at_most", "more")
#: objects in a premise scene (besides the occluder).
ENT_OBJECTS = (1, 4)
#: things a hypothesis counts: objects, shapes, clip-art objects, each shape, each colour's shapes, each noun.
_COUNTED = (
    _KINDS
    + tuple(Desc("shape", s) for s in SHAPES)
    + tuple(Desc("shape", None, c) for c in COLORS)
    + tuple(Desc("clipart", n) for n in NOUNS)
)
#: disjoint pairs "more" compares (both orders): shapes / clip art, two shapes, two colours, two nouns.
_COMPARED = (
    ((Desc("shape"), Desc("clipart")), (Desc("clipart"), Desc("shape")))
    + tuple((Desc("shape", a), Desc("shape", b)) for a in SHAPES for b in SHAPES if a != b)
    + tuple((Desc("shape", None, a), Desc("shape", None, b)) for a in COLORS for b in COLORS if a != b)
    + tuple((Desc("clipart", a), Desc("clipart", b)) for a in NOUNS for b in NOUNS if a != b)
)
#: the objects that could hide behind an occluder: any shape of any colour, any clip-art noun.
_HIDDEN = tuple(SceneObject("shape", s, c, (0, 0, 0, 0)) for s in SHAPES for c in COLORS) + tuple(
    SceneObject("clipart", n, None, (0, 0, 0, 0)) for n in NOUNS
)


@dataclass(frozen=True)
class _Hypothesis:
    """A hypothesis: ``family``, ``text``, the counted thing ``x``, the compared thing ``y`` (``more``) and
    the count ``n`` (``at_least`` / ``at_most``)."""

    family: str
    text: str
    x: Desc
    y: Desc | None = None
    n: int = 0

    def truth(self, objs: _Objs) -> bool:
        if self.family == "at_least":
            return self.x.count(objs) >= self.n
        if self.family == "at_most":
            return self.x.count(objs) <= self.n
        assert self.y is not None
        return self.x.count(objs) > self.y.count(objs)


def entailment_label(truth: Callable[[_Objs], bool], visible: _Objs, occluder: bool) -> str:
    """The label of a hypothesis (``truth`` of a list of objects) given the ``visible`` objects: the worlds
    consistent with the image are the visible objects alone and, when there is an occluder, the visible
    objects plus any one hidden object (any shape of any colour, any noun). ``entailment`` if the hypothesis
    holds in every world, ``contradiction`` if in none, ``neutral`` otherwise."""
    worlds = [list(visible)] + ([[*visible, h] for h in _HIDDEN] if occluder else [])
    values = {bool(truth(w)) for w in worlds}
    if values == {True}:
        return "entailment"
    if values == {False}:
        return "contradiction"
    return "neutral"


def _representative(*, matching: Desc | None = None, avoiding: Sequence[Desc] = ()) -> SceneObject | None:
    """The first possible object matching ``matching`` (any when ``None``) and none of ``avoiding``."""
    for o in _HIDDEN:
        if (matching is None or matching.matches(o)) and not any(d.matches(o) for d in avoiding):
            return o
    return None


@functools.cache
def _count_options(h: _Hypothesis) -> dict[str, tuple[tuple[int, int, int], ...]]:
    """``{label: ((x objects, y objects, other objects), ...)}``: every premise of
    :data:`ENT_OBJECTS` objects, as counts, by the label :func:`entailment_label` gives it (counts decide the
    truth of every family, so one representative object of each group stands for all)."""
    avoid = [h.x] + ([h.y] if h.y is not None else [])
    rx = _representative(matching=h.x)
    ry = _representative(matching=h.y, avoiding=[h.x]) if h.y is not None else None
    rz = _representative(avoiding=avoid)
    lo, hi = ENT_OBJECTS
    out: dict[str, list[tuple[int, int, int]]] = {label: [] for label in ENTAILMENT_LABELS}
    for cx in range(hi + 1):
        for cy in range(hi + 1 if ry is not None else 1):
            for cz in range(hi + 1 if rz is not None else 1):
                if not lo <= cx + cy + cz <= hi:
                    continue
                objs = [rx] * cx + [ry] * cy + [rz] * cz
                out[entailment_label(h.truth, objs, occluder=True)].append((cx, cy, cz))
    return {k: tuple(v) for k, v in out.items()}


@functools.cache
def _hypothesis_space() -> dict[str, tuple[_Hypothesis, ...]]:
    """Every hypothesis of each family that each of the three labels can have (so its text says nothing
    about its label)."""
    cands: dict[str, list[_Hypothesis]] = {f: [] for f in ENT_FAMILIES}
    for x in _COUNTED:
        for n in range(1, ENT_OBJECTS[1] + 1):
            be = "is" if n == 1 else "are"
            cands["at_least"].append(_Hypothesis("at_least", f"There {be} at least {x.number(n)}.", x, n=n))
            cands["at_most"].append(_Hypothesis("at_most", f"There {be} at most {x.number(n)}.", x, n=n))
    for x, y in _COMPARED:
        cands["more"].append(_Hypothesis("more", f"There are more {x.plural} than {y.plural}.", x, y))
    return {f: tuple(h for h in hs if all(_count_options(h).values())) for f, hs in cands.items()}


def _spec_of(d: Desc) -> ObjectSpec:
    return ObjectSpec(d.kind, d.name, d.color)


def _spec_avoiding(
    rng: np.random.Generator, banks: SpriteBanks, cfg: SceneConfig, avoid: Sequence[Desc]
) -> ObjectSpec:
    """A random object matching none of ``avoid``."""
    for _ in range(_MAX_TRIES):
        s = _complete_spec(rng, banks, ObjectSpec(), cfg)
        if not any(d.matches(SceneObject(s.kind, s.name or "", s.color, (0, 0, 0, 0))) for d in avoid):
            return s
    raise RuntimeError(f"no object avoiding {avoid}")


def generate_entailment(
    split: str, index: int, seed: int = 0, *, clipart_root: str | Path | None = None
) -> tuple[list[TaskExample], dict[str, Image.Image]]:
    """SNLI-VE-shaped: one scene (the premise: 1-4 objects and a grey occluder) and a hypothesis, ``label``
    ``entailment`` / ``neutral`` / ``contradiction``, exactly balanced over every aligned block of 3.

    The rule (:func:`entailment_label`): the occluder, in every premise, is an opaque grey square that may
    hide at most one object of any kind. A hypothesis is *entailment* when it is true of the visible objects
    and stays true whatever the occluder hides, *contradiction* when it is false of them and stays false,
    *neutral* when the occluder decides it.

    Families: ``at_least`` "There are at least two circles." / ``at_most`` "There is at most one animal."
    (objects, shapes, clip-art objects, a shape, a colour's shapes or a noun; only the counts all three
    labels can have: "at least three red shapes" is entailed by three visible, neutral with two,
    contradicted by one or none) and ``more`` "There are more red shapes than blue shapes." (shapes / clip
    art, two shapes, two colours or two nouns; entailment when ahead by two or more, neutral when level or
    ahead by one, contradiction when behind).

    Construction: the label is drawn first (block-balanced), then the hypothesis *independently of it* (a
    family uniformly, then a hypothesis uniformly), then the premise's counts: a number of objects uniformly
    among those the label allows for that hypothesis, then uniformly one split of it into counted /
    compared / other objects that has the label (:func:`_count_options`), then a scene of exactly those
    objects (others drawn at random among the objects neither thing describes), in random order. So every
    hypothesis is as likely under each label (the text alone says nothing), and every premise has an
    occluder (its presence says nothing): the label needs both."""
    task = "scene-entailment"
    rng = _rng(seed, task, split, index)
    want = _block_slot(seed, task, split, index, ENTAILMENT_LABELS)
    banks = sprite_banks(_part(split), clipart_root)
    cfg = SceneConfig(occluder=True, min_objects=ENT_OBJECTS[0], max_objects=ENT_OBJECTS[1])
    hyp = _draw(rng, _hypothesis_space())
    options = _count_options(hyp)[want]
    total = _choose(rng, sorted({sum(o) for o in options}))
    cx, cy, cz = _choose(rng, [o for o in options if sum(o) == total])
    avoid = [hyp.x] + ([hyp.y] if hyp.y is not None else [])
    specs = [_spec_of(hyp.x)] * cx + [_spec_of(d) for d in avoid[1:] for _ in range(cy)]
    specs += [_spec_avoiding(rng, banks, cfg, avoid) for _ in range(cz)]
    specs = [specs[i] for i in rng.permutation(len(specs))]
    scene = compose_scene(rng, banks, cfg, specs)
    got = entailment_label(hyp.truth, scene.objects, occluder=True)
    if got != want:  # the counts decide the label: a mismatch is a bug here
        raise RuntimeError(f"{task}: example {index} came out {got}, not {want}: {hyp.text}")
    key = _key(seed, task, split, index)
    name = f"{task}/{split}/{key}.png"
    ex = TaskExample(
        task=task,
        split=split,
        example_id=f"{split}-{index:06d}",
        images=(name,),
        text=hyp.text,
        label=want,
        meta={"family": hyp.family, "scene_key": key, "scenes": _meta_scenes(scene)},
    )
    return [ex], {name: scene.image}
