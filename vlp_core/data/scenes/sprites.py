"""The sprites of the bundled scene tasks: the shape / colour / clip-art vocabulary, the easy-VQA shape bank
and the Open Clip Art bank of each part (``train`` / ``test``), decoded lazily and cached per process. See
:mod:`vlp_core.data.scenes` for how sprites are cut out and how the parts are partitioned."""

from __future__ import annotations

import hashlib
import threading
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "CLIPART_EXCLUDE",
    "CLIPART_NOUNS",
    "CLIPART_ONLY",
    "COLORS",
    "NOUNS",
    "SHAPES",
    "TEST_SPLITS",
    "ClipArtBank",
    "ShapeBank",
    "Sprite",
    "SpriteBanks",
    "sprite_banks",
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
