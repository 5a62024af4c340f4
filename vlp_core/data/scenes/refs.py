"""``scene-refs`` (RefCOCO+-shaped): a scene's object boxes and an appearance-only referring expression."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from vlp_core.data.examples import TaskExample
from vlp_core.data.scenes.composition import (
    ObjectSpec,
    SceneConfig,
    _key,
    _meta_scenes,
    _rng,
    _unique_desc,
    compose_scene,
)
from vlp_core.data.scenes.sprites import SpriteBanks, _part, sprite_banks

__all__ = ["generate_refs"]


# --------------------------------------------------------------------------- scene-refs (RefCOCO+-shaped)


def _ref_specs(rng: np.random.Generator, banks: SpriteBanks, split: str) -> tuple[list[ObjectSpec], int]:
    """3-4 object specs and the target's position: a shape target (testA; half of train / val) gets
    distractors sharing its shape or its colour (never both); a clip-art target (testB) gets other clip art
    of other nouns. Duplicates of the target's description are never drawn."""
    n = int(rng.integers(3, 5))
    shape_target = split == "testA" or (split != "testB" and rng.random() < 0.5)
    combos, nouns = banks.shapes.combos, banks.clipart.nouns
    specs: list[ObjectSpec] = []
    if shape_target:
        ts, tc = combos[int(rng.integers(len(combos)))]
        specs.append(ObjectSpec("shape", ts, tc))
        for j in range(n - 1):
            u = rng.random()
            if j < 2 and u < 0.4:
                opts = [c for c in combos if c[0] == ts and c[1] != tc]
            elif j < 2 and u < 0.8:
                opts = [c for c in combos if c[1] == tc and c[0] != ts]
            elif rng.random() < 0.5:
                specs.append(ObjectSpec("clipart", str(nouns[int(rng.integers(len(nouns)))])))
                continue
            else:
                opts = [c for c in combos if c != (ts, tc)]
            s, c = opts[int(rng.integers(len(opts)))]
            specs.append(ObjectSpec("shape", s, c))
    else:
        tn = str(nouns[int(rng.integers(len(nouns)))])
        specs.append(ObjectSpec("clipart", tn))
        others = [x for x in nouns if x != tn]
        for _ in range(n - 1):
            if rng.random() < 0.5:
                specs.append(ObjectSpec("clipart", str(others[int(rng.integers(len(others)))])))
            else:
                s, c = combos[int(rng.integers(len(combos)))]
                specs.append(ObjectSpec("shape", s, c))
    order = rng.permutation(n)
    return [specs[int(i)] for i in order], int(np.argmin(order))


def generate_refs(
    split: str, index: int, seed: int = 0, *, clipart_root: str | Path | None = None
) -> tuple[list[TaskExample], dict[str, Image.Image]]:
    """RefCOCO+-shaped: one scene of 3-4 objects, ``boxes`` = every object's box (in object order),
    ``target`` = the referred object's index, ``text`` an appearance-only expression (no location words):
    the first of "the <shape>", "the <color> shape", "the <color> <shape>" (shapes) or "the <noun>" (clip
    art) that matches the target only. Distractors often share the target's shape or colour, so the
    expression is needed. Splits: train / val (either kind of target), testA (shape targets), testB (clip-art
    targets), like RefCOCO+'s people / other-objects test splits; ``group`` is the scene key."""
    task = "scene-refs"
    rng = _rng(seed, task, split, index)
    banks = sprite_banks(_part(split), clipart_root)
    specs, target = _ref_specs(rng, banks, split)
    scene = compose_scene(rng, banks, SceneConfig(), specs)
    desc = _unique_desc(scene.objects[target], scene.objects)
    if desc is None:  # cannot happen: specs never repeat the target's full description
        raise RuntimeError(f"{task}: target of example {index} not describable")
    if desc.kind == "clipart":
        kind = "noun"
    else:
        kind = "color_shape" if desc.name and desc.color else "shape" if desc.name else "color"
    key = _key(seed, task, split, index)
    name = f"{task}/{split}/{key}.png"
    ex = TaskExample(
        task=task,
        split=split,
        example_id=f"{split}-{index:06d}",
        images=(name,),
        text=desc.definite,
        boxes=tuple(tuple(float(v) for v in o.box) for o in scene.objects),  # type: ignore[misc]
        target=target,
        group=key,
        meta={
            "expression": kind,
            "target_kind": scene.objects[target].kind,
            "scene_key": key,
            "scenes": _meta_scenes(scene),
        },
    )
    return [ex], {name: scene.image}
