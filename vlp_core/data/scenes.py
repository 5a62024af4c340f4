"""Bundled downstream tasks built from real images: small scenes composed of easy-VQA shapes and Open Clip Art
sprites with known boxes, colours, shapes and categories, so that every downstream task shape (NLVR2, SNLI-VE,
RefCOCO+, GQA, Karpathy retrieval) can be trained and evaluated on a CPU with a real signal. Every label is
computed from the scene's ground-truth metadata, never by a model.

**Sprites.** Shapes come from the easy-VQA images (64x64, a light near-uniform background, one saturated
shape). Each image's shape (circle / rectangle / triangle) and colour (black, blue, brown, gray, green, red,
teal, yellow) are read from its questions (:func:`_parse_easy_vqa`); an image whose shape or colour is
missing or contradictory is skipped. The sprite: background = median colour of the border pixels, mask =
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
retrieval); see each generator's docstring for the construction. Every example's ``meta["scenes"]`` holds the
scenes' metadata as JSON (objects with kind, name, colour, box and sprite source; occluder; size), from which
the label can be re-derived.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import threading
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from vlp_core.data.examples import ENTAILMENT_LABELS, NLVR2_LABELS, TaskExample

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

SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("black", "blue", "brown", "gray", "green", "red", "teal", "yellow")
#: Open Clip Art category (first folder under ``png/``) -> the noun the tasks use; other categories unused.
CLIPART_NOUNS = {
    "animals": "animal",
    "buildings": "building",
    "food": "food",
    "people": "person",
    "plants": "plant",
    "tools": "tool",
    "transportation": "vehicle",
}
NOUNS = tuple(CLIPART_NOUNS.values())
#: sub-folders left out because their pictures are not the category's noun (clothes, body parts and smileys
#: are not persons; furniture is not a building).
CLIPART_EXCLUDE = {"buildings": ("furniture",), "people": ("bodypart", "clothing", "smilies")}
#: categories of which only these sub-folders are used (transportation's top level, road signs, pictograms
#: and boating diagrams are mostly not vehicles).
CLIPART_ONLY = {"transportation": ("vehicles",)}
#: splits drawn from the test sprites (easy-VQA test images, clip-art test part).
TEST_SPLITS = frozenset({"test", "testA", "testB"})
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


# --------------------------------------------------------------------------- sprites


@dataclass(frozen=True, eq=False)
class Sprite:
    """A cut-out object: ``image`` is RGBA cropped to its content; ``fill`` is the uniform colour of a shape
    sprite (its pixels all have it; only alpha varies), ``None`` for clip art."""

    kind: str
    name: str
    color: str | None
    image: Image.Image
    source: str
    fill: tuple[int, int, int] | None = None


def _pick_valid(
    rng: np.random.Generator, items: Sequence[Any], load: Callable[[Any], Sprite | None]
) -> Sprite:
    """A uniformly drawn item of ``items``; when it is unusable, the next usable one (in list order)."""
    start = int(rng.integers(len(items)))
    for k in range(len(items)):
        sprite = load(items[(start + k) % len(items)])
        if sprite is not None:
            return sprite
    raise RuntimeError("no usable sprite in the list")


def _parse_easy_vqa(
    texts: Sequence[str], answers: Sequence[str], image_ids: Sequence[int]
) -> dict[int, tuple[str, str] | str]:
    """Image id -> (shape, colour) from its questions, or a skip reason (``undetermined``: shape or colour
    not known; ``conflicting``: two different values said, or the said value also said absent).

    Evidence of what is there: the shape and colour words of a ``what ...`` question and its answer ("what
    is the red shape?" -> circle), and of a yes/no question that says something is there ("is there a red
    shape?" -> yes, "is no circle present?" -> no). Evidence of what is not: a yes/no question that says
    something is absent; a value no question names is the one left when all the others are absent."""
    present: dict[int, set[str]] = {}
    absent: dict[int, set[str]] = {}
    for text, answer, image_id in zip(texts, answers, image_ids, strict=True):
        image_id = int(image_id)
        words = text.rstrip("?").split()
        here = present.setdefault(image_id, set())
        gone = absent.setdefault(image_id, set())
        if text.startswith("what"):
            here.update(w for w in [*words, answer] if w in SHAPES or w in COLORS)
        elif answer in ("yes", "no"):
            there = (answer == "yes") != ("not" in words or "no" in words)
            (here if there else gone).update(w for w in words if w in SHAPES or w in COLORS)
    out: dict[int, tuple[str, str] | str] = {}
    for image_id, here in present.items():
        got = []
        for values in (SHAPES, COLORS):
            said = {v for v in here if v in values}
            left = [v for v in values if v not in absent[image_id]]
            if said - set(left) or len(said) > 1:
                got.append("conflicting")
            elif said:
                got.append(next(iter(said)))
            else:
                got.append(left[0] if len(left) == 1 else "undetermined")
        reason = next((g for g in got if g in ("conflicting", "undetermined")), None)
        out[image_id] = reason or (got[0], got[1])
    return out


def _shape_sprite(
    path: str, shape: str, color: str, source: str, threshold: int = 40, min_side: int = 14
) -> Sprite | str:
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.float64)
    except (OSError, ValueError, SyntaxError):
        return "decode_error"
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
    bg = np.median(border, axis=0)
    diff = np.abs(arr - bg).max(axis=-1)
    mask = diff > threshold
    if mask.sum() < 16:
        return "empty"
    ys, xs = np.nonzero(mask)
    if max(ys.max() - ys.min(), xs.max() - xs.min()) + 1 < min_side:
        return "small"
    y1, y2 = max(0, ys.min() - 2), min(arr.shape[0], ys.max() + 3)
    x1, x2 = max(0, xs.min() - 2), min(arr.shape[1], xs.max() + 3)
    core = np.median(arr[mask], axis=0)
    v = core - bg
    alpha = np.clip(((arr - bg) @ v) / max(float(v @ v), 1.0), 0.0, 1.0)
    alpha[diff < 8] = 0.0
    alpha = alpha[y1:y2, x1:x2]
    fill = tuple(int(round(c)) for c in core)
    rgba = np.empty(alpha.shape + (4,), dtype=np.uint8)
    rgba[..., :3] = fill
    rgba[..., 3] = np.round(alpha * 255).astype(np.uint8)
    return Sprite("shape", shape, color, Image.fromarray(rgba, "RGBA"), source, fill)  # type: ignore[arg-type]


class ShapeBank:
    """The easy-VQA shape sprites of one part (``train`` or ``test`` images), indexed by (shape, colour)."""

    def __init__(self, part: str):
        import easy_vqa

        if part not in ("train", "test"):
            raise ValueError(f"easy-VQA part {part!r}: train | test")
        self.part = part
        texts, answers, image_ids = getattr(easy_vqa, f"get_{part}_questions")()
        paths = getattr(easy_vqa, f"get_{part}_image_paths")()
        labels = _parse_easy_vqa(texts, answers, image_ids)
        #: skip reasons -> images (parse: ``undetermined`` / ``conflicting`` / ``no_questions``; decode, on
        #: first use: ``decode_error`` / ``empty`` / ``small``).
        self.skipped: Counter[str] = Counter()
        by_combo: dict[tuple[str, str], list[tuple[int, str]]] = {}
        for image_id in sorted(paths):
            got = labels.get(int(image_id), "no_questions")
            if isinstance(got, str):
                self.skipped[got] += 1
                continue
            by_combo.setdefault(got, []).append((int(image_id), paths[image_id]))
        self.by_combo = {k: tuple(v) for k, v in sorted(by_combo.items())}
        #: the (shape, colour) pairs that have images, sorted.
        self.combos = tuple(self.by_combo)
        self._cache: dict[int, Sprite | None] = {}
        self._lock = threading.Lock()

    def _load(self, combo: tuple[str, str], item: tuple[int, str]) -> Sprite | None:
        image_id, path = item
        with self._lock:
            return self._load_locked(combo, image_id, path)

    def _load_locked(self, combo: tuple[str, str], image_id: int, path: str) -> Sprite | None:
        if image_id not in self._cache:
            got = _shape_sprite(path, combo[0], combo[1], f"easy-vqa:{self.part}/{image_id}")
            if isinstance(got, str):
                self.skipped[got] += 1
                self._cache[image_id] = None
            else:
                self._cache[image_id] = got
        return self._cache[image_id]

    def sample(self, rng: np.random.Generator, shape: str, color: str) -> Sprite:
        items = self.by_combo.get((shape, color))
        if not items:
            raise KeyError(f"no easy-VQA {self.part} image of a {color} {shape}")
        return _pick_valid(rng, items, lambda it: self._load((shape, color), it))

    def scan(self) -> dict[str, int]:
        """Decode every image (slow-ish: 4,000 train images) and return usable / skipped counts."""
        usable = sum(self._load(c, it) is not None for c, items in self.by_combo.items() for it in items)
        return {"usable": usable, **{f"skipped:{k}": v for k, v in sorted(self.skipped.items())}}


def _bytes_hash(*parts: str) -> int:
    return int.from_bytes(hashlib.blake2b("\x1f".join(parts).encode(), digest_size=8).digest(), "little")


def _clipart_sprite(
    path: Path, noun: str, source: str, max_side: int = 160, max_pixels: int = 4_000_000
) -> Sprite | str:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.width * im.height > max_pixels:  # a few posters of 10k x 16k px: minutes to decode
                    return "too_large"
                im.load()
                rgba = im.convert("RGBA")
    except Image.DecompressionBombError:
        return "too_large"
    except (OSError, ValueError, SyntaxError):
        return "decode_error"
    arr = np.array(rgba)
    if (arr[..., 3] == 255).mean() > 0.99:
        # opaque: the near-white area connected to the border is background
        white = (arr[..., :3].min(axis=-1) >= 235).astype(np.uint8) * 255
        padded = Image.new("L", (white.shape[1] + 2, white.shape[0] + 2), 255)
        padded.paste(Image.fromarray(white, "L"), (1, 1))
        ImageDraw.floodfill(padded, (0, 0), 128, thresh=0)
        outside = np.asarray(padded)[1:-1, 1:-1] == 128
        arr[..., 3] = np.where(outside, 0, 255).astype(np.uint8)
    alpha = arr[..., 3]
    solid = alpha > 16
    if not solid.any():
        return "empty"
    ys, xs = np.nonzero(solid)
    crop = arr[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    h, w = crop.shape[:2]
    if max(h, w) < 40:
        return "tiny"
    if max(h, w) > 4 * min(h, w):
        return "elongated"
    opaque = crop[..., 3] > 128
    if opaque.mean() < 0.08:
        return "sparse"
    if (crop[..., :3][opaque].min(axis=-1) >= 225).mean() > 0.9:
        return "faint"
    image = Image.fromarray(crop, "RGBA")
    if max(h, w) > max_side:
        f = max_side / max(h, w)
        image = image.resize((max(1, round(w * f)), max(1, round(h * f))), Image.Resampling.LANCZOS)
    return Sprite("clipart", noun, None, image, source)


class ClipArtBank:
    """The Open Clip Art sprites of one part (``train`` or ``test``), indexed by noun.

    ``root`` is the ``png`` folder (``DataLayout.default().openclipart / "png"``). Files are listed sorted;
    a file is in the test part when ``blake2b(relative path) % 100 < test_percent``; each (category, part)
    keeps at most ``per_category`` files, the first by ``blake2b("pick", relative path)``.
    """

    def __init__(self, root: str | Path, part: str, per_category: int = 60, test_percent: int = 30):
        if part not in ("train", "test"):
            raise ValueError(f"clip-art part {part!r}: train | test")
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root} missing: run `make setup` (fetches Open Clip Art)")
        self.part = part
        self.by_noun: dict[str, tuple[str, ...]] = {}
        for category, noun in CLIPART_NOUNS.items():
            rels = sorted(p.relative_to(self.root).as_posix() for p in (self.root / category).rglob("*.png"))
            only, drop = CLIPART_ONLY.get(category), CLIPART_EXCLUDE.get(category, ())
            rels = [
                r for r in rels if r.split("/")[1] not in drop and (only is None or r.split("/")[1] in only)
            ]
            mine = [r for r in rels if (_bytes_hash(r) % 100 < test_percent) == (part == "test")]
            chosen = sorted(mine, key=lambda r: (_bytes_hash("pick", r), r))[:per_category]
            if chosen:
                self.by_noun[noun] = tuple(sorted(chosen))
        #: the nouns that have files, in :data:`NOUNS` order.
        self.nouns = tuple(n for n in NOUNS if n in self.by_noun)
        #: skip reasons -> files (on first use: decode_error / empty / tiny / elongated / sparse / faint).
        self.skipped: Counter[str] = Counter()
        self._cache: dict[str, Sprite | None] = {}
        self._lock = threading.Lock()

    def _load(self, noun: str, rel: str) -> Sprite | None:
        with self._lock:
            return self._load_locked(noun, rel)

    def _load_locked(self, noun: str, rel: str) -> Sprite | None:
        if rel not in self._cache:
            got = _clipart_sprite(self.root / rel, noun, f"openclipart:{rel}")
            if isinstance(got, str):
                self.skipped[got] += 1
                self._cache[rel] = None
            else:
                self._cache[rel] = got
        return self._cache[rel]

    def sample(self, rng: np.random.Generator, noun: str) -> Sprite:
        items = self.by_noun.get(noun)
        if not items:
            raise KeyError(f"no clip art for {noun!r} in part {self.part}")
        return _pick_valid(rng, items, lambda rel: self._load(noun, rel))

    def scan(self) -> dict[str, int]:
        """Decode every listed file and return usable (per noun) / skipped counts."""
        out: dict[str, int] = {}
        for noun, rels in self.by_noun.items():
            out[f"usable:{noun}"] = sum(self._load(noun, r) is not None for r in rels)
        return {**out, **{f"skipped:{k}": v for k, v in sorted(self.skipped.items())}}


@dataclass(frozen=True, eq=False)
class SpriteBanks:
    """The shape and clip-art sprites of one part."""

    shapes: ShapeBank
    clipart: ClipArtBank


_BANKS: dict[tuple[str, str], SpriteBanks] = {}
_BANKS_LOCK = threading.Lock()


def _banks(part: str, root: str) -> SpriteBanks:
    with _BANKS_LOCK:  # one bank per (part, root) per process, also when threads ask at once
        if (part, root) not in _BANKS:
            _BANKS[part, root] = SpriteBanks(ShapeBank(part), ClipArtBank(root, part))
        return _BANKS[part, root]


def sprite_banks(part: str, clipart_root: str | Path | None = None) -> SpriteBanks:
    """The sprite banks of ``part`` (``train`` / ``test``), built lazily and cached per process (thread-safe).
    ``clipart_root``: the Open Clip Art ``png`` folder (default: the project's data directory's)."""
    if clipart_root is None:
        from vlp_core.paths import DataLayout

        clipart_root = DataLayout.default().openclipart / "png"
    return _banks(part, str(Path(clipart_root).expanduser().resolve()))


def _part(split: str) -> str:
    return "test" if split in TEST_SPLITS else "train"


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
#: the objects that could hide behind an occluder: any shape of any colour, any clip-art noun.
_HIDDEN = tuple(SceneObject("shape", s, c, (0, 0, 0, 0)) for s in SHAPES for c in COLORS) + tuple(
    SceneObject("clipart", n, None, (0, 0, 0, 0)) for n in NOUNS
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


def _present_descs(objects: Sequence[SceneObject]) -> list[Desc]:
    return sorted({d for o in objects for d in _object_descs(o)}, key=lambda d: _VOCAB.index(d))


def _choose(rng: np.random.Generator, cands: Sequence[Any]) -> Any:
    return cands[int(rng.integers(len(cands)))]


def _join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _block_slot(seed: int, task: str, split: str, index: int, items: Sequence[Any]) -> Any:
    """Item ``perm[index % k]`` of a permutation of the ``k`` items seeded by block ``index // k``."""
    k = len(items)
    perm = _rng(seed, task, split, "block", index // k).permutation(k)
    return items[int(perm[index % k])]


def _meta_scenes(*scenes: Scene) -> str:
    return json.dumps([s.to_dict() for s in scenes], sort_keys=True, separators=(",", ":"))


def _key(seed: int, task: str, split: str, index: int) -> str:
    return f"{stable_seed(seed, task, split, index):016x}"


# --------------------------------------------------------------------------- scene-pairs (NLVR2-shaped)

PAIR_FAMILIES = ("exist", "both", "exactly_one", "neither", "more", "same_count", "count")
#: counts a statement may name, per kind: only counts a scene can have and miss (scenes have 2-4 objects).
_COUNTS = {Desc(): (2, 3, 4), Desc("shape"): (1, 2, 3), Desc("clipart"): (1, 2, 3)}
_Objs = Sequence[SceneObject]


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
def _pair_space() -> dict[str, tuple[_Statement, ...]]:
    """Every statement of each family; ``truth(left, right)``."""
    sides = ("left", "right")

    def pick(side: str, left: _Objs, right: _Objs) -> tuple[_Objs, _Objs]:
        return (left, right) if side == "left" else (right, left)

    space: dict[str, list[_Statement]] = {f: [] for f in PAIR_FAMILIES}
    for x in _VOCAB:
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
    return {f: tuple(v) for f, v in space.items()}


def _draw(rng: np.random.Generator, space: dict[str, tuple[Any, ...]]) -> Any:
    """A family uniformly, then one of its statements uniformly."""
    family = list(space)[int(rng.integers(len(space)))]
    return _choose(rng, space[family])


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
    split: str, index: int, seed: int = 0, *, clipart_root: str | Path | None = None
) -> tuple[list[TaskExample], dict[str, Image.Image]]:
    """NLVR2-shaped: two scenes (left, right; 2-4 objects each) and a statement, ``label`` ``"true"`` /
    ``"false"``, exactly balanced over every aligned block of 2 examples.

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
    task = "scene-pairs"
    rng = _rng(seed, task, split, index)
    want = _block_slot(seed, task, split, index, (True, False))
    banks = sprite_banks(_part(split), clipart_root)
    cfg = SceneConfig()
    space = _pair_space()
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
    return {
        f: tuple(h for h in hs if all(_count_options(h).values())) for f, hs in cands.items()
    }


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


# --------------------------------------------------------------------------- scene-captions (retrieval)


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


# --------------------------------------------------------------------------- registry

Generator = Callable[..., tuple[list[TaskExample], dict[str, Image.Image]]]


@dataclass(frozen=True)
class SceneTaskSpec:
    """A bundled task: ``generate(split, index, seed)`` -> (examples, ``{image name: image}``); ``sizes``
    the default number of units per split (examples; scenes for ``scene-captions``, 5 examples each);
    ``labels`` the label set (``None`` for open answers, boxes or retrieval); ``shape`` the dataset shape
    (``nlvr2``, ``snli-ve``, ``refcoco``, ``gqa``, ``retrieval``); ``description`` how it is built."""

    name: str
    shape: str
    generate: Generator
    sizes: dict[str, int]
    labels: tuple[str, ...] | None
    description: str
    unit: str = "example"
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
            "scene-entailment",
            "snli-ve",
            generate_entailment,
            {"train": 3000, "val": 300, "test": 600},
            ENTAILMENT_LABELS,
            "One scene as premise (1-4 objects and, always, a grey occluder that may hide one object) and a "
            "hypothesis (at least / at most n things, more X than Y); entailment if true whatever the occluder "
            "hides, contradiction if false whatever it hides, neutral if the occluder decides; balanced 1/3 "
            "each, the hypothesis drawn independently of the label, then a premise with counts that give it "
            "the label.",
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
