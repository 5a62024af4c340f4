"""Bundled downstream tasks built from real images: small scenes composed of easy-VQA shapes and Open Clip Art
sprites with known boxes, colours, shapes and categories, so that every downstream task shape (NLVR2, SNLI-VE,
RefCOCO+, GQA, Karpathy retrieval) can be trained and evaluated on a CPU with a real signal. Every label is
computed from the scene's ground-truth metadata, never by a model.

**Sprites.** Shapes come from the easy-VQA images (64x64, a light near-uniform background, one saturated
shape). Each image's shape (circle / rectangle / triangle) and colour (black, blue, brown, gray, green, red,
teal, yellow) are read from its questions (:func:`.sprites._parse_easy_vqa`); an image whose shape or colour
is missing or contradictory is skipped. The sprite: background = median colour of the border pixels, mask =
pixels whose largest channel difference from it exceeds 40, cropped to the mask's box (plus two pixels of
anti-aliased edge); its colour is the mask's median colour and its alpha the fraction of that colour in each
pixel (so edges stay anti-aliased and carry no background halo); upscaled, the alpha is smoothed and
steepened back to a one-pixel edge. Shapes under 14 px (drawn 9-33 px) are skipped as too coarse to upscale.
Clip art comes from ``<openclipart>/png/<category>/**.png`` of the categories in :data:`CLIPART_NOUNS`
(others unused; only the sub-folders of :data:`CLIPART_ONLY` and not those of :data:`CLIPART_EXCLUDE`, whose
pictures mostly are not the noun), cropped to the alpha box (opaque images: the near-white area connected to
the border becomes transparent first). Files that fail to decode, are over 4 Mpx (a few 10k x 16k posters),
or whose crop is tiny (< 40 px), elongated (> 4:1), sparse (< 8 % opaque) or faint (almost all near-white)
are skipped. Sprites are decoded lazily and cached per process; a skipped file is replaced by the next one
of its list, so a draw depends only on the files.

**Partition.** Train and val splits use the easy-VQA *train* images and the clip-art *train* part; every test
split (``test``, ``testA``, ``testB``) uses the easy-VQA *test* images and the clip-art *test* part, so test
scenes never reuse a training sprite. A clip-art file is in the test part when ``blake2b(relative path) %
100 < 30``; each (category, part) keeps at most 60 files, the first by ``blake2b("pick", path)``.

**Scenes** (:func:`compose_scene`): a 256x256 RGB canvas of a light colour from :data:`BACKGROUNDS`, 2-4
objects (each scaled to 56-96 px on its longer side, all shrunk in 7 % steps while they do not fit) placed
without overlap (6 px margin) by rejection sampling, optionally an *occluder*: an opaque uniformly grey (184)
square of 90 px placed on free space, which could hide (at most) one object. Spatial relations use box
centres with a 16 px margin (:func:`relation`): ``a`` is left of ``b`` when ``cx(b) - cx(a) > 16``, not left
of it when ``< -16``, undecided in between (questions and labels never rest on an undecided relation).

**Determinism.** Example ``i`` of split ``s`` is built from ``numpy.random.default_rng(stable_seed(seed,
task, s, i))`` (BLAKE2b, never Python's ``hash``), so any slice rebuilt alone, in any process, gives the same
examples and the same PNG bytes (:func:`encode_png`). Images are named ``<task>/<split>/<scene_key>.png``
with ``scene_key`` the same hash in hex (pairs: ``<scene_key>-left`` / ``-right``). Where a task balances
labels exactly, the label of example ``i`` is slot ``i % k`` of a permutation of the ``k`` labels seeded by
block ``i // k``: exact balance over every aligned block, no pattern in the index.

**Tasks** (:data:`SCENE_TASKS`; the names are ours, not the real datasets'): ``scene-pairs`` (NLVR2-shaped),
``scene-entailment`` (SNLI-VE), ``scene-refs`` (RefCOCO+), ``scene-qa`` (GQA), ``scene-captions`` (Karpathy
retrieval), and ``scene-pairs-easy``, built only on request (scene-pairs at 1-2 objects a scene, existence
statements only: a probe); see each generator's docstring for the construction. Every example's
``meta["scenes"]`` holds the scenes' metadata as JSON (objects with kind, name, colour, box and sprite source;
occluder; size), from which the label can be re-derived.

**Layout.** This package's ``__init__`` holds the registry (:data:`SCENE_TASKS`, :class:`SceneTaskSpec`),
:func:`generate`, :func:`build_split` and :func:`chance_level`, and re-exports the public names of its modules
(``from vlp_core.data.scenes import X`` works for every name in ``__all__``, and for the families / slots
constants of the generators): :mod:`~vlp_core.data.scenes.sprites` (the shape / colour / clip-art vocabulary,
the easy-VQA and Open Clip Art sprite banks and their loading), :mod:`~vlp_core.data.scenes.composition`
(seeds, PNG encoding, scenes, relations, descriptions, and the constants and private helpers the generators
share), and one module per task generator: :mod:`~vlp_core.data.scenes.pairs`,
:mod:`~vlp_core.data.scenes.entailment`, :mod:`~vlp_core.data.scenes.refs`, :mod:`~vlp_core.data.scenes.qa`,
:mod:`~vlp_core.data.scenes.captions`. The tasks' code version (:func:`stores.shards.code_version`) covers
every module of the package.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from vlp_core.data.examples import ENTAILMENT_LABELS, NLVR2_LABELS, TaskExample
from vlp_core.data.scenes.captions import generate_captions
from vlp_core.data.scenes.composition import (
    BACKGROUNDS,
    OCCLUDER_GREY,
    REL_MARGIN,
    RELATIONS,
    Desc,
    ObjectSpec,
    Scene,
    SceneConfig,
    SceneObject,
    compose_scene,
    encode_png,
    relation,
    stable_seed,
    write_images,
)
from vlp_core.data.scenes.entailment import ENT_FAMILIES as ENT_FAMILIES
from vlp_core.data.scenes.entailment import ENT_OBJECTS as ENT_OBJECTS
from vlp_core.data.scenes.entailment import entailment_label, generate_entailment
from vlp_core.data.scenes.pairs import PAIR_FAMILIES as PAIR_FAMILIES
from vlp_core.data.scenes.pairs import generate_pairs
from vlp_core.data.scenes.qa import QA_SLOTS as QA_SLOTS
from vlp_core.data.scenes.qa import generate_qa
from vlp_core.data.scenes.refs import generate_refs
from vlp_core.data.scenes.sprites import (
    CLIPART_EXCLUDE,
    CLIPART_NOUNS,
    CLIPART_ONLY,
    COLORS,
    NOUNS,
    SHAPES,
    TEST_SPLITS,
    ClipArtBank,
    ShapeBank,
    Sprite,
    SpriteBanks,
    sprite_banks,
)
from vlp_core.data.scenes.sprites import _parse_easy_vqa as _parse_easy_vqa

__all__ = [
    "BACKGROUNDS",
    "CLIPART_EXCLUDE",
    "CLIPART_NOUNS",
    "CLIPART_ONLY",
    "COLORS",
    "NOUNS",
    "OCCLUDER_GREY",
    "REL_MARGIN",
    "RELATIONS",
    "SCENE_TASKS",
    "SHAPES",
    "TEST_SPLITS",
    "ClipArtBank",
    "Desc",
    "ObjectSpec",
    "Scene",
    "SceneConfig",
    "SceneObject",
    "SceneTaskSpec",
    "ShapeBank",
    "Sprite",
    "SpriteBanks",
    "build_split",
    "chance_level",
    "default_tasks",
    "compose_scene",
    "encode_png",
    "entailment_label",
    "generate",
    "generate_captions",
    "generate_entailment",
    "generate_pairs",
    "generate_qa",
    "generate_refs",
    "relation",
    "sprite_banks",
    "stable_seed",
    "write_images",
]


# --------------------------------------------------------------------------- registry

Generator = Callable[..., tuple[list[TaskExample], dict[str, Image.Image]]]


@dataclass(frozen=True)
class SceneTaskSpec:
    """A bundled task: ``generate(split, index, seed)`` -> (examples, ``{image name: image}``); ``sizes``
    the default number of units per split (examples; scenes for ``scene-captions``, 5 examples each);
    ``labels`` the label set (``None`` for open answers, boxes or retrieval); ``shape`` the dataset shape
    (``nlvr2``, ``snli-ve``, ``refcoco``, ``gqa``, ``retrieval``); ``description`` how it is built;
    ``default``: built when no task is named (variants such as ``scene-pairs-easy`` only on request)."""

    name: str
    shape: str
    generate: Generator
    sizes: dict[str, int]
    labels: tuple[str, ...] | None
    description: str
    unit: str = "example"
    default: bool = True
    splits: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "splits", tuple(self.sizes))


SCENE_TASKS: dict[str, SceneTaskSpec] = {
    s.name: s
    for s in (
        SceneTaskSpec(
            "scene-pairs",
            "nlvr2",
            generate_pairs,
            {"train": 3000, "val": 300, "test": 600},
            NLVR2_LABELS,
            "Two scenes of easy-VQA shapes and clip art and a statement about them (existence, counts, "
            "comparison across the two images); true / false balanced exactly: the truth value is drawn "
            "first, the statement independently of it, then scenes until the statement has that value, so "
            "the text alone says nothing.",
        ),
        SceneTaskSpec(
            "scene-pairs-easy",
            "nlvr2",
            functools.partial(generate_pairs, level="easy"),
            {"train": 3000, "val": 300, "test": 600},
            NLVR2_LABELS,
            "scene-pairs at its easiest: 1-2 objects a scene and only the existence of a shape or a colour's "
            "shapes (the left / right image, both, exactly one, neither); a probe of whether a model checks "
            "a statement against an image at all. Built on request.",
            default=False,
        ),
        SceneTaskSpec(
            "scene-entailment",
            "snli-ve",
            generate_entailment,
            {"train": 3000, "val": 300, "test": 600},
            ENTAILMENT_LABELS,
            "One scene as premise (1-4 objects and, always, a grey occluder that may hide one object) and a "
            "hypothesis (at least / at most n things, more X than Y); entailment if true whatever the "
            "occluder hides, contradiction if false whatever it hides, neutral if the occluder decides; "
            "balanced 1/3 each, the hypothesis drawn independently of the label, then a premise with counts "
            "that give it the label.",
        ),
        SceneTaskSpec(
            "scene-refs",
            "refcoco",
            generate_refs,
            {"train": 3000, "val": 300, "testA": 300, "testB": 300},
            None,
            "One scene of 3-4 objects; candidates are every object's box; the expression is the shortest "
            "appearance-only description that picks the target alone (the circle / the red shape / the red "
            "circle / the animal), with distractors sharing its shape or colour. testA: shape targets, "
            "testB: clip-art targets.",
        ),
        SceneTaskSpec(
            "scene-qa",
            "gqa",
            generate_qa,
            {"train": 4500, "val": 450, "test": 900},
            None,
            "Compositional questions about one scene of 3-4 objects with relations from box centres "
            "(query colour / name of the object in a relation to a uniquely described one, verify a relation "
            "or existence, count, compare counts); one-word answers; yes/no balanced within verify types.",
        ),
        SceneTaskSpec(
            "scene-captions",
            "retrieval",
            generate_captions,
            {"train": 1000, "val": 100, "test": 100},
            None,
            "One scene of 2-4 objects with 5 captions describing its objects differently (list, a spatial "
            "relation, left to right, shape names only, colours only); one example per caption, grouped by "
            "the scene's image. Sizes count scenes.",
            unit="scene",
        ),
    )
}


def default_tasks() -> list[str]:
    """The bundled tasks built when none is named (all but those built on request, e.g. ``scene-pairs-easy``)."""
    return [name for name, spec in SCENE_TASKS.items() if spec.default]


def generate(
    task: str, split: str, index: int, seed: int = 0, *, clipart_root: str | Path | None = None
) -> tuple[list[TaskExample], dict[str, Image.Image]]:
    """Unit ``index`` of ``split`` of the bundled ``task``: its examples and ``{image name: image}``."""
    spec = SCENE_TASKS.get(task)
    if spec is None:
        raise KeyError(f"unknown bundled task {task!r}; known: {sorted(SCENE_TASKS)}")
    if split not in spec.sizes:
        raise ValueError(f"{task}: split {split!r} not one of {list(spec.sizes)}")
    return spec.generate(split, int(index), int(seed), clipart_root=clipart_root)


def build_split(
    task: str,
    split: str,
    start: int = 0,
    stop: int | None = None,
    seed: int = 0,
    *,
    clipart_root: str | Path | None = None,
) -> tuple[list[TaskExample], dict[str, Image.Image]]:
    """Units ``start`` to ``stop`` (default: the split's default size) of ``split``, concatenated."""
    stop = SCENE_TASKS[task].sizes[split] if stop is None else stop
    examples: list[TaskExample] = []
    images: dict[str, Image.Image] = {}
    for i in range(start, stop):
        exs, ims = generate(task, split, i, seed, clipart_root=clipart_root)
        examples.extend(exs)
        images.update(ims)
    return examples, images


def chance_level(task: str, examples: Sequence[TaskExample]) -> float:
    """The chance level of ``examples`` of ``task``: the majority label's share for classification
    (``nlvr2``, ``snli-ve``) and open answers (``gqa``: always answering the split's most frequent answer);
    the mean of 1 / number of candidate boxes for ``refcoco``; 1 / number of images (groups) for
    ``retrieval`` (R@1 of a random ranking, text -> image)."""
    if not examples:
        raise ValueError("no examples")
    shape = SCENE_TASKS[task].shape
    if shape == "refcoco":
        return float(np.mean([1.0 / len(e.boxes) for e in examples]))
    if shape == "retrieval":
        return 1.0 / len({e.group for e in examples})
    counts = Counter(e.label for e in examples)
    return counts.most_common(1)[0][1] / len(examples)
