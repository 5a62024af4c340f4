"""``scene-qa`` (GQA-shaped): compositional questions about one scene with one-word answers."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from vlp_core.data.examples import TaskExample
from vlp_core.data.scenes.composition import (
    _KINDS,
    _MAX_TRIES,
    _VOCAB,
    RELATIONS,
    Desc,
    SceneConfig,
    SceneObject,
    _block_slot,
    _choose,
    _key,
    _meta_scenes,
    _object_descs,
    _rng,
    _unique_desc,
    compose_scene,
    relation,
)
from vlp_core.data.scenes.sprites import COLORS, SHAPES, _part, sprite_banks

__all__ = ["QA_SLOTS", "generate_qa"]


# --------------------------------------------------------------------------- scene-qa (GQA-shaped)

#: (question type, wanted yes/no answer) of each slot of a block: yes and no exactly balanced within every
#: verify / compare type.
QA_SLOTS = (
    ("query_color", None),
    ("query_name", None),
    ("count", None),
    ("verify_rel", "yes"),
    ("verify_rel", "no"),
    ("verify_exist", "yes"),
    ("verify_exist", "no"),
    ("compare", "yes"),
    ("compare", "no"),
)


def _present_descs(objects: Sequence[SceneObject]) -> list[Desc]:
    return sorted({d for o in objects for d in _object_descs(o)}, key=lambda d: _VOCAB.index(d))


def _relation_targets(
    objs: Sequence[SceneObject], ref: SceneObject, rel: str, pool: Desc
) -> list[SceneObject] | None:
    """The objects (other than ``ref``) matching ``pool`` that are ``rel`` ``ref``; ``None`` when one of
    them is undecided."""
    out = []
    for o in objs:
        if o is ref or not pool.matches(o):
            continue
        r = relation(o, ref, rel)
        if r is None:
            return None
        if r:
            out.append(o)
    return out


def _qa_candidates(qtype: str, objs: Sequence[SceneObject]) -> list[tuple[str, str, bool]]:
    """(question, answer, preferred) for every question of ``qtype`` about ``objs`` that has a decided
    answer; ``preferred`` marks the harder ones (described things present in the scene)."""
    out: list[tuple[str, str, bool]] = []
    refs = [(o, _unique_desc(o, objs)) for o in objs]
    refs = [(o, d) for o, d in refs if d is not None]
    present = set(_present_descs(objs))
    if qtype == "query_color":
        for ref, d in refs:
            for rel, words in RELATIONS.items():
                hits = _relation_targets(objs, ref, rel, Desc("shape"))
                if hits is not None and len(hits) == 1:
                    out.append((f"What color is the shape {words} {d.definite}?", str(hits[0].color), True))
    elif qtype == "query_name":
        for ref, d in refs:
            for rel, words in RELATIONS.items():
                hits = _relation_targets(objs, ref, rel, Desc())
                if hits is not None and len(hits) == 1:
                    out.append((f"What is the object {words} {d.definite}?", hits[0].name, True))
    elif qtype == "verify_rel":
        for ref, d in refs:
            for rel, words in RELATIONS.items():
                for x in _VOCAB:
                    if x == d:
                        continue
                    hits = _relation_targets(objs, ref, rel, x)
                    if hits is not None:
                        ans = "yes" if hits else "no"
                        out.append((f"Is there {x.indef} {words} {d.definite}?", ans, x in present))
    elif qtype == "verify_exist":
        for x in _VOCAB:
            n = x.count(objs)
            near = n > 0 or any(
                x.kind == "shape" and x.name and x.color and (p.name == x.name or p.color == x.color)
                for p in objs
                if p.kind == "shape"
            )
            out.append((f"Is there {x.indef} in the image?", "yes" if n else "no", near))
    elif qtype == "count":
        descs = list(_KINDS) + [x for x in _VOCAB if not (x.name and x.color)]
        for x in descs:
            n = x.count(objs)
            out.append((f"How many {x.plural} are there?", str(n), n > 0))
    elif qtype == "compare":
        pairs = [(Desc("shape"), Desc("clipart")), (Desc("clipart"), Desc("shape"))]
        pairs += [(Desc("shape", None, a), Desc("shape", None, b)) for a in COLORS for b in COLORS if a != b]
        pairs += [(Desc("shape", a), Desc("shape", b)) for a in SHAPES for b in SHAPES if a != b]
        for a, b in pairs:
            na, nb = a.count(objs), b.count(objs)
            if na + nb > 0:
                out.append(
                    (f"Are there more {a.plural} than {b.plural}?", "yes" if na > nb else "no", na * nb > 0)
                )
    else:
        raise ValueError(qtype)
    return out


def generate_qa(
    split: str, index: int, seed: int = 0, *, clipart_root: str | Path | None = None
) -> tuple[list[TaskExample], dict[str, Image.Image]]:
    """GQA-shaped: a compositional question about one scene of 3-4 objects, ``label`` the one-word answer
    (a colour, a shape, a noun, ``yes`` / ``no`` or a digit), ``meta["qtype"]``:

    - ``query_color`` "What color is the shape to the left of the triangle?" (the colour of the one shape in
      that relation to the reference);
    - ``query_name`` "What is the object above the blue rectangle?" (shape name or noun);
    - ``verify_rel`` "Is there a circle to the right of the animal?";
    - ``verify_exist`` "Is there a red triangle in the image?";
    - ``count`` "How many red shapes are there?";
    - ``compare`` "Are there more shapes than clip-art objects?" (strictly more; equal is ``no``).

    References are the shortest unique appearance description of an object ("the triangle", "the red
    shape", "the red circle", "the animal"); relations compare box centres with :data:`REL_MARGIN` and a
    question is only asked when every object it depends on is decided. The type (and, for verify / compare,
    the yes/no answer) comes from :data:`QA_SLOTS` by block, so yes and no are exactly balanced within each;
    then, among the scene's questions of that type with that answer, one uniformly (harder ones, about
    things present in the scene, with probability 0.7). Count questions draw their answer first, uniformly
    over the counts the scene's questions have, so small counts do not dominate."""
    task = "scene-qa"
    rng = _rng(seed, task, split, index)
    qtype, want = _block_slot(seed, task, split, index, QA_SLOTS)
    banks = sprite_banks(_part(split), clipart_root)
    for _ in range(_MAX_TRIES):
        scene = compose_scene(rng, banks, SceneConfig(min_objects=3, max_objects=4))
        cands = [c for c in _qa_candidates(qtype, scene.objects) if want in (None, c[1])]
        if qtype == "count" and cands:  # the answer first (uniformly over those possible), then a question
            answers = sorted({c[1] for c in cands})
            answer = answers[int(rng.integers(len(answers)))]
            cands = [c for c in cands if c[1] == answer]
        preferred = [c for c in cands if c[2]]
        if preferred and rng.random() < 0.7:
            cands = preferred
        if cands:
            break
    else:
        raise RuntimeError(f"{task}: no {qtype} question for example {index}")
    text, answer, _ = _choose(rng, cands)
    atype = {"query_color": "color", "query_name": "name", "count": "number"}.get(qtype, "yes/no")
    key = _key(seed, task, split, index)
    name = f"{task}/{split}/{key}.png"
    ex = TaskExample(
        task=task,
        split=split,
        example_id=f"{split}-{index:06d}",
        images=(name,),
        text=text,
        label=answer,
        meta={"qtype": qtype, "answer_type": atype, "scene_key": key, "scenes": _meta_scenes(scene)},
    )
    return [ex], {name: scene.image}
