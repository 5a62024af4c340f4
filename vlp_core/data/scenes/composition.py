"""Scene composition for the bundled scene tasks: seeds (:func:`stable_seed`), PNG encoding, scenes and
their objects (:func:`compose_scene`), spatial relations (:func:`relation`), descriptions of objects
(:class:`Desc`), and the constants and private helpers the task generators share. See
:mod:`vlp_core.data.scenes` for the construction."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from vlp_core.data.scenes.sprites import COLORS, NOUNS, SHAPES, Sprite, SpriteBanks

__all__ = [
    "BACKGROUNDS",
    "OCCLUDER_GREY",
    "REL_MARGIN",
    "RELATIONS",
    "Desc",
    "ObjectSpec",
    "Scene",
    "SceneConfig",
    "SceneObject",
    "compose_scene",
    "encode_png",
    "relation",
    "stable_seed",
    "write_images",
]

#: light canvas colours.
BACKGROUNDS = (
    (246, 242, 232),
    (236, 243, 250),
    (240, 248, 238),
    (250, 240, 242),
    (244, 244, 240),
    (248, 246, 226),
)
OCCLUDER_GREY = (184, 184, 184)
#: relation name -> its words in text.
RELATIONS = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
#: pixels between box centres below which a relation is undecided.
REL_MARGIN = 16

_SEED_MASK = (1 << 63) - 1
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")
_MAX_TRIES = 200
Box = tuple[int, int, int, int]


def stable_seed(*parts: object) -> int:
    """A stable 63-bit seed from ``parts`` (BLAKE2b of their ``str``, joined): the same in every process."""
    text = "\x1f".join(str(p) for p in parts)
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _SEED_MASK


def _rng(*parts: object) -> np.random.Generator:
    return np.random.default_rng(stable_seed(*parts))


def encode_png(image: Image.Image) -> bytes:
    """The image as PNG bytes, deterministically (RGB, compress level 6, no optimisation, no metadata)."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG", compress_level=6, optimize=False)
    return buf.getvalue()


def write_images(images: dict[str, Image.Image], root: str | Path) -> list[Path]:
    """Write ``{relative name: image}`` under ``root`` with :func:`encode_png`; returns the paths."""
    out = []
    for name in sorted(images):
        path = Path(root) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode_png(images[name]))
        out.append(path)
    return out


# --------------------------------------------------------------------------- scenes


@dataclass(frozen=True)
class SceneObject:
    """One object of a scene: ``kind`` ``shape`` | ``clipart``; ``name`` the shape or the clip-art noun;
    ``color`` the shape's colour (``None`` for clip art); ``box`` (x1, y1, x2, y2) in pixels, exclusive
    right/bottom edges; ``source`` the sprite's origin (``easy-vqa:<part>/<id>``, ``openclipart:<path>``)."""

    kind: str
    name: str
    color: str | None
    box: Box
    source: str = ""

    @property
    def center(self) -> tuple[float, float]:
        x1, y1, x2, y2 = self.box
        return (x1 + x2) / 2, (y1 + y2) / 2

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "color": self.color,
            "box": list(self.box),
            "source": self.source,
        }


@dataclass(frozen=True, eq=False)
class Scene:
    """A composed scene: the RGB ``image``, its ``objects`` (in the order they were asked for), the
    ``occluder`` box if any and the ``background`` colour."""

    image: Image.Image
    objects: tuple[SceneObject, ...]
    occluder: Box | None = None
    background: tuple[int, int, int] = BACKGROUNDS[0]

    def to_dict(self) -> dict[str, Any]:
        return {
            "size": [self.image.width, self.image.height],
            "background": list(self.background),
            "objects": [o.to_dict() for o in self.objects],
            "occluder": list(self.occluder) if self.occluder else None,
        }


@dataclass(frozen=True)
class ObjectSpec:
    """What object to draw; ``None`` fields are drawn at random (``kind`` by ``SceneConfig.shape_fraction``,
    a shape's (shape, colour) uniformly over the bank's pairs, a noun uniformly)."""

    kind: str | None = None
    name: str | None = None
    color: str | None = None


@dataclass(frozen=True)
class SceneConfig:
    size: int = 256
    min_objects: int = 2
    max_objects: int = 4
    min_side: int = 56
    max_side: int = 96
    margin: int = 6
    shape_fraction: float = 0.6
    occluder: bool = False
    occluder_side: int = 90
    backgrounds: tuple[tuple[int, int, int], ...] = BACKGROUNDS


def _complete_spec(
    rng: np.random.Generator, banks: SpriteBanks, spec: ObjectSpec, cfg: SceneConfig
) -> ObjectSpec:
    kind = spec.kind or ("shape" if rng.random() < cfg.shape_fraction else "clipart")
    if kind == "clipart":
        return ObjectSpec(
            "clipart", spec.name or str(banks.clipart.nouns[rng.integers(len(banks.clipart.nouns))])
        )
    combos = [c for c in banks.shapes.combos if spec.name in (None, c[0]) and spec.color in (None, c[1])]
    if not combos:
        raise KeyError(f"no easy-VQA sprite for {spec}")
    shape, color = combos[int(rng.integers(len(combos)))]
    return ObjectSpec("shape", shape, color)


def _render_sprite(sprite: Sprite, side: int) -> Image.Image:
    """``sprite`` scaled so its longer side is ``side``, cropped to its visible pixels (RGBA)."""
    w, h = sprite.image.size
    f = side / max(w, h)
    size = (max(1, round(w * f)), max(1, round(h * f)))
    if sprite.fill is not None:
        # shapes are upscaled (easy-VQA draws them 9-33 px): the alpha, padded so no edge is clamped, is
        # upscaled, smoothed (rounds the source's pixel steps) and steepened from an f px ramp to ~1 px
        pad = 2
        src = Image.new("L", (w + 2 * pad, h + 2 * pad), 0)
        src.paste(sprite.image.getchannel("A"), (pad, pad))
        size = (round((w + 2 * pad) * f), round((h + 2 * pad) * f))
        alpha = src.resize(size, Image.Resampling.BICUBIC)
        if f > 1:
            alpha = alpha.filter(ImageFilter.GaussianBlur(0.4 * f))
            a = np.asarray(alpha, dtype=np.float64) / 255.0
            a = np.clip((a - 0.5) * f + 0.5, 0.0, 1.0)
            alpha = Image.fromarray(np.round(a * 255).astype(np.uint8), "L")
        image = Image.new("RGBA", size, sprite.fill + (0,))
        image.putalpha(alpha)
    else:
        image = sprite.image.resize(size, Image.Resampling.LANCZOS)
    bbox = image.getchannel("A").point(lambda v: 255 if v > 8 else 0).getbbox()
    return image.crop(bbox) if bbox else image


def _overlaps(a: Box, b: Box, margin: int) -> bool:
    return a[0] < b[2] + margin and b[0] < a[2] + margin and a[1] < b[3] + margin and b[1] < a[3] + margin


def _place(
    rng: np.random.Generator, sizes: Sequence[tuple[int, int]], cfg: SceneConfig, occluder: bool
) -> tuple[list[Box], Box | None] | None:
    """Boxes for ``sizes`` (and the occluder first), no two within ``margin``; ``None`` when it fails."""
    placed: list[Box] = []

    def put(w: int, h: int) -> Box | None:
        for _ in range(200):
            x = int(rng.integers(0, cfg.size - w + 1))
            y = int(rng.integers(0, cfg.size - h + 1))
            box = (x, y, x + w, y + h)
            if not any(_overlaps(box, p, cfg.margin) for p in placed):
                placed.append(box)
                return box
        return None

    occ = None
    if occluder:
        occ = put(cfg.occluder_side, cfg.occluder_side)
        if occ is None:
            return None
    boxes: list[Box | None] = [None] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i][0] * sizes[i][1]):
        boxes[i] = put(*sizes[i])
        if boxes[i] is None:
            return None
    return [b for b in boxes if b is not None], occ


def compose_scene(
    rng: np.random.Generator,
    banks: SpriteBanks,
    cfg: SceneConfig = SceneConfig(),
    specs: Sequence[ObjectSpec] | None = None,
) -> Scene:
    """Compose a scene: ``specs`` (default: ``min_objects``-``max_objects`` random ones) drawn from
    ``banks``, each scaled to ``min_side``-``max_side`` px on its longer side and placed without overlap;
    ``cfg.occluder`` adds the grey occluder square on free space. All randomness comes from ``rng``."""
    if specs is None:
        specs = [ObjectSpec()] * int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    full = [_complete_spec(rng, banks, s, cfg) for s in specs]
    sprites = [
        banks.shapes.sample(rng, s.name, s.color) if s.kind == "shape" else banks.clipart.sample(rng, s.name)
        for s in full
    ]
    sides = [int(rng.integers(cfg.min_side, cfg.max_side + 1)) for _ in sprites]
    background = cfg.backgrounds[int(rng.integers(len(cfg.backgrounds)))]
    for attempt in range(30):
        scale = 0.93**attempt
        rendered = [
            _render_sprite(sp, max(24, round(side * scale))) for sp, side in zip(sprites, sides, strict=True)
        ]
        got = _place(rng, [im.size for im in rendered], cfg, cfg.occluder)
        if got is not None:
            break
    else:
        raise RuntimeError(f"cannot place {len(sprites)} objects on a {cfg.size}px canvas")
    boxes, occ = got
    canvas = Image.new("RGB", (cfg.size, cfg.size), background)
    if occ is not None:
        ImageDraw.Draw(canvas).rectangle((occ[0], occ[1], occ[2] - 1, occ[3] - 1), fill=OCCLUDER_GREY)
    objects = []
    for sp, im, box in zip(sprites, rendered, boxes, strict=True):
        canvas.paste(im, box[:2], im)
        objects.append(SceneObject(sp.kind, sp.name, sp.color, box, sp.source))
    return Scene(canvas, tuple(objects), occ, background)


def relation(a: SceneObject, b: SceneObject, rel: str, margin: float = REL_MARGIN) -> bool | None:
    """Whether ``a`` is ``rel`` (left / right / above / below) ``b`` by box centres: ``True`` when the
    centres differ by more than ``margin`` the right way, ``False`` when by more than ``margin`` the other
    way, ``None`` (undecided) in between."""
    (ax, ay), (bx, by) = a.center, b.center
    d = {"left": bx - ax, "right": ax - bx, "above": by - ay, "below": ay - by}[rel]
    return True if d > margin else False if d < -margin else None


# --------------------------------------------------------------------------- descriptions


@dataclass(frozen=True)
class Desc:
    """A description of objects: ``kind`` ``shape`` | ``clipart`` | ``None`` (any object), ``name`` (shape
    or noun) and ``color`` (shapes) or ``None`` for any."""

    kind: str | None = None
    name: str | None = None
    color: str | None = None

    def matches(self, obj: SceneObject) -> bool:
        return (
            self.kind in (None, obj.kind)
            and self.name in (None, obj.name)
            and (self.color is None or self.color == obj.color)
        )

    def count(self, objects: Sequence[SceneObject]) -> int:
        return sum(self.matches(o) for o in objects)

    @property
    def phrase(self) -> str:
        """``red circle``, ``circle``, ``red shape``, ``shape``, ``animal``, ``clip-art object``,
        ``object``."""
        if self.kind is None:
            return "object"
        if self.kind == "clipart":
            return self.name or "clip-art object"
        return f"{self.color + ' ' if self.color else ''}{self.name or 'shape'}"

    @property
    def indef(self) -> str:
        p = self.phrase
        if p == "food":
            return "food"
        return ("an " if p[0] in "aeiou" else "a ") + p

    @property
    def definite(self) -> str:
        return "the " + self.phrase

    @property
    def plural(self) -> str:
        p = self.phrase
        return {"person": "people", "food": "food items"}.get(p, p + "s")

    def number(self, n: int) -> str:
        """``one shape``, ``two red shapes``, ..."""
        return f"{_NUMBER_WORDS[n]} {self.phrase if n == 1 else self.plural}"


#: the kind descriptions used in counts: objects, shapes, clip-art objects.
_KINDS = (Desc(), Desc("shape"), Desc("clipart"))
#: every existence description: coloured shapes, shapes, colour shapes, nouns.
_VOCAB = (
    tuple(Desc("shape", s, c) for s in SHAPES for c in COLORS)
    + tuple(Desc("shape", s) for s in SHAPES)
    + tuple(Desc("shape", None, c) for c in COLORS)
    + tuple(Desc("clipart", n) for n in NOUNS)
)


def _object_descs(obj: SceneObject) -> list[Desc]:
    """The shortest first: ``the circle``, ``the red shape``, ``the red circle`` (shapes); ``the noun``."""
    if obj.kind == "clipart":
        return [Desc("clipart", obj.name)]
    return [Desc("shape", obj.name), Desc("shape", None, obj.color), Desc("shape", obj.name, obj.color)]


def _unique_desc(obj: SceneObject, objects: Sequence[SceneObject]) -> Desc | None:
    """The first of :func:`_object_descs` that matches ``obj`` only, or ``None``."""
    for d in _object_descs(obj):
        if d.count(objects) == 1:
            return d
    return None


def _choose(rng: np.random.Generator, cands: Sequence[Any]) -> Any:
    return cands[int(rng.integers(len(cands)))]


def _block_slot(seed: int, task: str, split: str, index: int, items: Sequence[Any]) -> Any:
    """Item ``perm[index % k]`` of a permutation of the ``k`` items seeded by block ``index // k``."""
    k = len(items)
    perm = _rng(seed, task, split, "block", index // k).permutation(k)
    return items[int(perm[index % k])]


def _meta_scenes(*scenes: Scene) -> str:
    return json.dumps([s.to_dict() for s in scenes], sort_keys=True, separators=(",", ":"))


def _key(seed: int, task: str, split: str, index: int) -> str:
    return f"{stable_seed(seed, task, split, index):016x}"


_Objs = Sequence[SceneObject]


def _draw(rng: np.random.Generator, space: dict[str, tuple[Any, ...]]) -> Any:
    """A family uniformly, then one of its statements uniformly."""
    family = list(space)[int(rng.integers(len(space)))]
    return _choose(rng, space[family])
