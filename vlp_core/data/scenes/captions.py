"""``scene-captions`` (Karpathy-shaped retrieval): one scene and five captions describing it differently."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from vlp_core.data.examples import TaskExample
from vlp_core.data.scenes.composition import (
    RELATIONS,
    Desc,
    SceneConfig,
    SceneObject,
    _choose,
    _key,
    _meta_scenes,
    _rng,
    compose_scene,
    relation,
)
from vlp_core.data.scenes.sprites import _part, sprite_banks

__all__ = ["generate_captions"]


# --------------------------------------------------------------------------- scene-captions (retrieval)


def _join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _full(o: SceneObject) -> Desc:
    return Desc(o.kind, o.name, o.color)


def _captions(rng: np.random.Generator, objs: Sequence[SceneObject]) -> list[tuple[str, str]]:
    order = [objs[int(i)] for i in rng.permutation(len(objs))]
    caps = [("list", _join([_full(o).indef for o in order]))]
    rels = [
        (a, rel, b)
        for a in objs
        for b in objs
        if a is not b
        for rel in RELATIONS
        if relation(a, b, rel) is True
    ]
    if rels:
        a, rel, b = _choose(rng, rels)
        caps.append(("relation", f"a picture of {_full(a).indef} {RELATIONS[rel]} {_full(b).indef}"))
    else:
        a, b = order[0], order[1]
        caps.append(("relation", f"a picture of {_full(a).indef} next to {_full(b).indef}"))
    ltr = sorted(objs, key=lambda o: (o.center[0], o.center[1]))
    ltr_text = f"{Desc().number(len(objs))}, from left to right: " + _join([_full(o).indef for o in ltr])
    caps.append(("left_to_right", ltr_text))
    caps.append(("names", "an image with " + _join([Desc(o.kind, o.name).indef for o in order])))
    colours = [Desc(o.kind, None if o.kind == "shape" else o.name, o.color).indef for o in order]
    caps.append(("colors", "a scene showing " + _join(colours)))
    return caps


def generate_captions(
    split: str, index: int, seed: int = 0, *, clipart_root: str | Path | None = None
) -> tuple[list[TaskExample], dict[str, Image.Image]]:
    """Karpathy-shaped retrieval: one scene (2-4 objects) and 5 captions, one :class:`TaskExample` each
    (``group`` = the scene's image name, ``meta["style"]``), each describing the objects differently:
    ``list`` "a red circle and an animal" (random order), ``relation`` "a picture of a red circle to the
    left of an animal" (a decided relation by box centres), ``left_to_right`` "three objects, from left to
    right: ...", ``names`` "an image with a circle and an animal" (no colours), ``colors`` "a scene showing a
    red shape and an animal" (no shape names). ``index`` counts scenes, not captions."""
    task = "scene-captions"
    rng = _rng(seed, task, split, index)
    banks = sprite_banks(_part(split), clipart_root)
    scene = compose_scene(rng, banks, SceneConfig())
    key = _key(seed, task, split, index)
    name = f"{task}/{split}/{key}.png"
    meta_scene = _meta_scenes(scene)
    exs = [
        TaskExample(
            task=task,
            split=split,
            example_id=f"{split}-{index:06d}-{k}",
            images=(name,),
            text=text,
            group=name,
            meta={"style": style, "scene_key": key, "scenes": meta_scene},
        )
        for k, (style, text) in enumerate(_captions(rng, scene.objects))
    ]
    return exs, {name: scene.image}
