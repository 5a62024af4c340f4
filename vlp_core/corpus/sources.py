"""Readers for image and text sources.

A source is split into *units* (a file, a byte range of a big text file, a tar shard, a parquet row group),
each with a fingerprint that changes when its content may have changed. Shards are groups of units; the store
keys finished shards by their units' fingerprints, so a re-run processes only new or changed units.

Readers never raise on bad records: an unreadable record comes back with ``error`` set and becomes a reject
row downstream. They stream: memory is bounded by one record (images) or one line (text).
"""

from __future__ import annotations

import glob
import json
import os
import re
import tarfile
import xml.etree.ElementTree as ET
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pyarrow.parquet as pq

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


@dataclass(frozen=True)
class Unit:
    """The smallest re-processable piece of a source."""

    key: str
    fingerprint: str


@dataclass
class ReadError:
    reason: str
    detail: str


@dataclass
class ImageRecord:
    """One raw image input: its bytes (or why they could not be read) and any captions that came with it."""

    uri: str
    data: bytes | None
    category: str | None = None
    captions: list[tuple[str, str]] = field(default_factory=list)  # (kind, text)
    error: ReadError | None = None
    meta_error: ReadError | None = None  # captions unreadable; the image itself is still good


@dataclass
class TextRecord:
    """One raw text input. ``split`` marks a document to be split into sentences."""

    uri: str
    data: bytes | str | None
    split: bool = False
    error: ReadError | None = None


def _file_fingerprint(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def _expand(paths: str | list[str]) -> list[Path]:
    """Expand globs; a directory means every regular file below it. Sorted, de-duplicated."""
    out: set[Path] = set()
    for p in [paths] if isinstance(paths, str) else paths:
        p = os.path.expanduser(p)
        matches = glob.glob(p, recursive=True) if any(c in p for c in "*?[") else [p]
        if not matches:
            raise FileNotFoundError(f"no file matches {p!r}")
        for m in matches:
            mp = Path(m)
            if mp.is_dir():
                out.update(f for f in mp.rglob("*") if f.is_file() and not f.name.startswith("."))
            else:
                out.add(mp)
    return sorted(out)


def _row_group_units(paths: str | list[str]) -> list[Unit]:
    """One unit per Parquet row group: ``<file>#rg<i>``."""
    out = []
    for p in _expand(paths):
        fp = _file_fingerprint(p)
        out += [Unit(f"{p}#rg{i}", fp) for i in range(pq.ParquetFile(p).num_row_groups)]
    return out


def read_file_bounded(path: Path, max_bytes: int) -> bytes | ReadError:
    """Read a whole file unless it is bigger than ``max_bytes``; errors become a ReadError."""
    try:
        size = path.stat().st_size
        if size > max_bytes:
            return ReadError("file_too_large", f"{size} bytes > max_file_bytes={max_bytes}")
        with open(path, "rb") as f:
            return f.read(max_bytes + 1)
    except OSError as exc:
        return ReadError("unreadable", f"{type(exc).__name__}: {exc}")


class Source(ABC):
    """A named input. ``modality`` is ``image`` or ``text``."""

    kind: ClassVar[str]
    modality: ClassVar[str]

    def __init__(self, name: str):
        self.name = name

    @abstractmethod
    def units(self) -> list[Unit]:
        """All units, in a deterministic order."""

    @abstractmethod
    def read(self, units: list[Unit], max_file_bytes: int = 256 * 2**20) -> Iterator[Any]:
        """Stream the records of ``units`` (ImageRecord or TextRecord)."""

    def describe(self) -> str:
        return f"{self.kind}:{self.name}"


# ---------------------------------------------------------------------------------------------- images


class ImageDirSource(Source):
    """Every non-hidden file under ``root`` (non-images become ``not_an_image`` rejects).

    The category of an image is the first folder below ``root`` when ``category_from_dir`` is set.
    Symlinks are followed; the content hash later collapses the duplicates they create.
    """

    kind = "image_dir"
    modality = "image"

    def __init__(self, name: str, root: str | Path, category_from_dir: bool = True):
        super().__init__(name)
        self.root = Path(root).expanduser()
        self.category_from_dir = category_from_dir
        if not self.root.is_dir():
            raise FileNotFoundError(f"image source {name!r}: {self.root} is not a directory")

    def units(self) -> list[Unit]:
        out = []
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=False):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for fn in filenames:
                if fn.startswith("."):
                    continue
                p = Path(dirpath) / fn
                try:
                    fp = _file_fingerprint(p)
                except OSError:  # broken symlink: keep it so it becomes a reject row
                    fp = "missing"
                out.append(Unit(p.relative_to(self.root).as_posix(), fp))
        return sorted(out, key=lambda u: u.key)

    def category(self, rel: str) -> str | None:
        parts = rel.split("/")
        return parts[0] if self.category_from_dir and len(parts) > 1 else None

    def captions(self, rel: str) -> tuple[list[tuple[str, str]], ReadError | None]:
        return [], None

    def read(self, units: list[Unit], max_file_bytes: int = 256 * 2**20) -> Iterator[ImageRecord]:
        for u in units:
            data = read_file_bounded(self.root / u.key, max_file_bytes)
            caps, meta_err = self.captions(u.key)
            rec = ImageRecord(
                uri=str(self.root / u.key), data=None, category=self.category(u.key), captions=caps
            )
            rec.meta_error = meta_err
            if isinstance(data, ReadError):
                rec.error = data
            else:
                rec.data = data
            yield rec


_SVG_NS = {
    "rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#",
    "dc": "http://purl.org/dc/elements/1.1/",
    "cc": "http://web.resource.org/cc/",
}
_GENERIC_KEYWORDS = {"unsorted", "clip art", "clipart", "image", "media", "png", "svg", "public domain"}


def parse_svg_metadata(path: Path) -> dict[str, Any]:
    """Title, description and keywords from an SVG's RDF metadata (Dublin Core), streaming.

    Returns ``{"title": str|None, "description": str|None, "keywords": [str]}``; raises on malformed XML.
    Only the ``cc:Work`` element is read (publisher/creator titles are people, not captions).
    """
    title = desc = None
    keywords: list[str] = []
    in_work = in_agent = 0
    work_tag, agent_tag = f"{{{_SVG_NS['cc']}}}Work", f"{{{_SVG_NS['cc']}}}Agent"
    for event, el in ET.iterparse(str(path), events=("start", "end")):
        tag = el.tag
        if tag in (work_tag, agent_tag):
            step = 1 if event == "start" else -1
            if tag == work_tag:
                in_work += step
                if event == "end":
                    break  # the metadata is read; don't parse the drawing
            else:
                in_agent += step
            continue
        if event != "end" or not in_work or in_agent:
            continue
        if tag == f"{{{_SVG_NS['dc']}}}title" and title is None:
            title = (el.text or "").strip() or None
        elif tag == f"{{{_SVG_NS['dc']}}}description" and desc is None:
            desc = (el.text or "").strip() or None
        elif tag == f"{{{_SVG_NS['rdf']}}}li":
            kw = (el.text or "").strip()
            if kw and kw.lower() not in _GENERIC_KEYWORDS:
                keywords.append(kw)
    return {"title": title, "description": desc, "keywords": keywords}


class OpenClipArtSource(ImageDirSource):
    """The Open Clip Art Library as Debian ships it: ``png/<category>/…`` with matching ``svg/…`` files.

    Captions (title, description, keywords) come from the SVG's RDF metadata and are kept as *known pairs*
    so the unpaired mode can hide them. Category = first folder (22 categories).
    """

    kind = "openclipart"

    def __init__(self, name: str, root: str | Path):
        root = Path(root).expanduser()
        super().__init__(name, root / "png", category_from_dir=True)
        self.svg_root = root / "svg"

    def captions(self, rel: str) -> tuple[list[tuple[str, str]], ReadError | None]:
        svg = self.svg_root / (rel.rsplit(".", 1)[0] + ".svg")
        if not svg.exists():
            return [], None
        try:
            meta = parse_svg_metadata(svg)
        except (ET.ParseError, OSError, UnicodeError) as exc:
            return [], ReadError("svg_metadata_unreadable", f"{svg.name}: {exc}")
        caps: list[tuple[str, str]] = []
        if meta["title"]:
            caps.append(("title", meta["title"]))
        if meta["description"] and meta["description"] != meta["title"]:
            caps.append(("description", meta["description"]))
        if meta["keywords"]:
            caps.append(("keywords", ", ".join(dict.fromkeys(meta["keywords"]))))
        return caps, None


class EasyVQASource(ImageDirSource):
    """The easy-VQA images shipped in the ``easy-vqa`` package; category = split (train / test).

    ``limit_per_split``: keep the first N images (by file name) of each named split, e.g. ``{train: 1000,
    test: 300}`` (the quick start: enough for its VQA runs); a split not named keeps all its images."""

    kind = "easy_vqa"

    def __init__(
        self, name: str, root: str | Path | None = None, limit_per_split: dict[str, int] | None = None
    ):
        if root is None:
            import easy_vqa

            root = Path(easy_vqa.__file__).parent / "data"
        super().__init__(name, root, category_from_dir=True)
        self.limit_per_split = dict(limit_per_split or {})

    def units(self) -> list[Unit]:
        units = [u for u in super().units() if "/images/" in u.key]
        if not self.limit_per_split:
            return units
        kept, seen = [], {}
        for u in units:
            split = u.key.split("/", 1)[0]
            seen[split] = seen.get(split, 0) + 1
            if seen[split] <= self.limit_per_split.get(split, len(units)):
                kept.append(u)
        return kept


_WDS_CAPTION_KEYS = ("caption", "text", "txt")


class WebDatasetSource(Source):
    """WebDataset tar shards: members grouped by key (path up to the first dot of the basename).

    An image member (jpg/png/webp/…) is the image; ``.txt`` or ``.json`` (field caption/text) gives a caption,
    kept as a known pair. One unit per tar. A key with a caption but no image → reject ``no_image``.
    """

    kind = "webdataset"
    modality = "image"

    def __init__(self, name: str, paths: str | list[str]):
        super().__init__(name)
        self.paths = paths

    def units(self) -> list[Unit]:
        return [Unit(str(p), _file_fingerprint(p)) for p in _expand(self.paths)]

    def read(self, units: list[Unit], max_file_bytes: int = 256 * 2**20) -> Iterator[ImageRecord]:
        for u in units:
            try:
                tf = tarfile.open(u.key, mode="r|*")  # noqa: SIM115 - streaming, closed in finally below
            except (tarfile.TarError, OSError) as exc:
                yield ImageRecord(uri=u.key, data=None, error=ReadError("unreadable_shard", str(exc)))
                continue
            group: dict[str, Any] = {}
            current = None
            try:
                for m in tf:
                    if not m.isfile():
                        continue
                    dirname, base = os.path.split(m.name)
                    if "." not in base:
                        continue
                    stem, ext = base.split(".", 1)
                    key = os.path.join(dirname, stem)
                    if current is not None and key != current:
                        yield self._record(u.key, current, group)
                        group = {}
                    current = key
                    if m.size > max_file_bytes:
                        group[ext.lower()] = ReadError("file_too_large", f"{m.size} bytes")
                        continue
                    f = tf.extractfile(m)
                    group[ext.lower()] = f.read() if f else b""
                if current is not None:
                    yield self._record(u.key, current, group)
            except (tarfile.TarError, OSError, EOFError) as exc:
                yield ImageRecord(
                    uri=f"{u.key}::{current}", data=None, error=ReadError("truncated_shard", str(exc))
                )
            finally:
                tf.close()

    @staticmethod
    def _record(tar: str, key: str, group: dict[str, Any]) -> ImageRecord:
        uri = f"{tar}::{key}"
        caps: list[tuple[str, str]] = []
        meta_err = None
        if isinstance(group.get("txt"), bytes):
            caps.append(("caption", group["txt"].decode("utf-8", "replace")))
        if isinstance(group.get("json"), bytes):
            try:
                meta = json.loads(group["json"])
                for k in _WDS_CAPTION_KEYS:
                    if isinstance(meta, dict) and isinstance(meta.get(k), str) and not caps:
                        caps.append(("caption", meta[k]))
            except ValueError as exc:
                meta_err = ReadError("invalid_json", f"{key}.json: {exc}")
        img_ext = next((e for e in group if "." + e.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS), None)
        if img_ext is None:
            return ImageRecord(uri=uri, data=None, error=ReadError("no_image", f"members: {sorted(group)}"))
        data = group[img_ext]
        rec = ImageRecord(uri=uri, data=None, captions=caps, meta_error=meta_err)
        if isinstance(data, ReadError):
            rec.error = data
        else:
            rec.data = data
        return rec


class ParquetImageSource(Source):
    """Parquet manifests (img2dataset / CC3M-style): one row per image.

    The image is an embedded bytes column (``jpg``/``image``/``png``/``bytes``; a struct with ``bytes`` as
    Hugging Face writes it works too) or a local ``path`` column (relative to the manifest's folder). Rows
    that only have a remote ``url`` are rejected as ``remote_url``: download them first (img2dataset), since
    nothing here fetches from the network. Optional ``caption``/``text`` column → known pair. One unit per
    row group.
    """

    kind = "parquet_images"
    modality = "image"
    BYTES_COLUMNS = ("jpg", "image", "png", "webp", "bytes")
    CAPTION_COLUMNS = ("caption", "text")

    def __init__(self, name: str, paths: str | list[str]):
        super().__init__(name)
        self.paths = paths

    def units(self) -> list[Unit]:
        return _row_group_units(self.paths)

    def read(self, units: list[Unit], max_file_bytes: int = 256 * 2**20) -> Iterator[ImageRecord]:
        for u in units:
            path, rg = u.key.rsplit("#rg", 1)
            try:
                table = pq.ParquetFile(path).read_row_group(int(rg))
            except Exception as exc:  # noqa: BLE001 - corrupt file → one reject for the unit
                yield ImageRecord(uri=u.key, data=None, error=ReadError("unreadable_shard", str(exc)))
                continue
            cols = set(table.column_names)
            bcol = next((c for c in self.BYTES_COLUMNS if c in cols), None)
            ccol = next((c for c in self.CAPTION_COLUMNS if c in cols), None)
            rows = table.to_pylist()
            for i, row in enumerate(rows):
                uri = f"{path}#{int(rg)}:{i}"
                caps = [("caption", row[ccol])] if ccol and isinstance(row.get(ccol), str) else []
                rec = ImageRecord(uri=uri, data=None, captions=caps)
                blob = row.get(bcol) if bcol else None
                if isinstance(blob, dict):
                    blob = blob.get("bytes")
                if isinstance(blob, bytes | bytearray):
                    rec.data = bytes(blob)
                elif row.get("path"):
                    p = Path(row["path"])
                    p = p if p.is_absolute() else Path(path).parent / p
                    rec.uri = str(p)
                    got = read_file_bounded(p, max_file_bytes)
                    if isinstance(got, ReadError):
                        rec.error = got
                    else:
                        rec.data = got
                elif row.get("url"):
                    rec.error = ReadError("remote_url", f"{row['url']} (download it first, e.g. img2dataset)")
                else:
                    rec.error = ReadError("no_image", f"row has none of {self.BYTES_COLUMNS + ('path',)}")
                yield rec


# ------------------------------------------------------------------------------------------------ text


class LineTextSource(Source):
    """One record per line (BookCorpus style); ``documents=True`` splits each line into sentences.

    Big files are cut into byte ranges of ``unit_bytes``; a range owns the lines that *start* inside it, so
    ranges can be read independently and in parallel. Blank lines are separators (counted, not rejected).
    Records are identified by ``file@byte_offset``.
    """

    kind = "lines"
    modality = "text"

    def __init__(
        self, name: str, paths: str | list[str], documents: bool = False, unit_bytes: int = 32 * 2**20
    ):
        super().__init__(name)
        self.paths = paths
        self.documents = documents
        self.unit_bytes = unit_bytes

    def units(self) -> list[Unit]:
        out = []
        for p in _expand(self.paths):
            fp = _file_fingerprint(p)
            size = p.stat().st_size
            for start in range(0, max(size, 1), self.unit_bytes):
                out.append(Unit(f"{p}@{start}-{min(start + self.unit_bytes, size)}", fp))
        return out

    def _lines(self, unit: Unit) -> Iterator[tuple[int, bytes]]:
        path, rng = unit.key.rsplit("@", 1)
        start, end = (int(x) for x in rng.split("-"))
        with open(path, "rb") as f:
            pos = start
            if start > 0:
                f.seek(start - 1)
                prev = f.read(1)
                if prev != b"\n":
                    skipped = f.readline()  # the line that started in the previous range
                    pos = start + len(skipped)
            f.seek(pos)
            while pos < end:
                line = f.readline()
                if not line:
                    break
                yield pos, line
                pos += len(line)

    def read(self, units: list[Unit], max_file_bytes: int = 256 * 2**20) -> Iterator[TextRecord]:
        for u in units:
            path = u.key.rsplit("@", 1)[0]
            for pos, line in self._lines(u):
                if len(line) > max_file_bytes:
                    yield TextRecord(
                        f"{path}@{pos}", None, error=ReadError("too_long", f"{len(line)} bytes in one line")
                    )
                    continue
                body = line.rstrip(b"\r\n")
                if not body.strip():
                    continue
                yield from self._records(f"{path}@{pos}", body)

    def _records(self, uri: str, body: bytes) -> Iterator[TextRecord]:
        yield TextRecord(uri, body, split=self.documents)


class JsonlTextSource(LineTextSource):
    """JSON lines with the text in ``field`` (default ``text``); bad JSON → ``invalid_json`` reject."""

    kind = "jsonl"

    def __init__(self, name: str, paths: str | list[str], field: str = "text", documents: bool = False):
        super().__init__(name, paths, documents=documents)
        self.field = field

    def _records(self, uri: str, body: bytes) -> Iterator[TextRecord]:
        try:
            obj = json.loads(body)
        except ValueError as exc:
            yield TextRecord(uri, None, error=ReadError("invalid_json", str(exc)))
            return
        val = obj.get(self.field) if isinstance(obj, dict) else None
        if not isinstance(val, str):
            yield TextRecord(uri, None, error=ReadError("missing_field", f"no string field {self.field!r}"))
            return
        yield TextRecord(uri, val, split=self.documents)


class ParquetTextSource(Source):
    """Parquet files with a text ``column``; one unit per row group."""

    kind = "parquet_text"
    modality = "text"

    def __init__(self, name: str, paths: str | list[str], column: str = "text", documents: bool = False):
        super().__init__(name)
        self.paths = paths
        self.column = column
        self.documents = documents

    def units(self) -> list[Unit]:
        return _row_group_units(self.paths)

    def read(self, units: list[Unit], max_file_bytes: int = 256 * 2**20) -> Iterator[TextRecord]:
        for u in units:
            path, rg = u.key.rsplit("#rg", 1)
            try:
                col = pq.ParquetFile(path).read_row_group(int(rg), columns=[self.column]).column(0)
            except Exception as exc:  # noqa: BLE001
                yield TextRecord(u.key, None, error=ReadError("unreadable_shard", str(exc)))
                continue
            for i, val in enumerate(col.to_pylist()):
                uri = f"{path}#{int(rg)}:{i}"
                if val is None:
                    yield TextRecord(uri, None, error=ReadError("empty_text", "null"))
                elif isinstance(val, bytes):
                    yield TextRecord(uri, val, split=self.documents)
                else:
                    yield TextRecord(uri, str(val), split=self.documents)


class WordNetSource(Source):
    """WordNet 3.0 ``data.{noun,verb,adj,adv}``: every gloss definition and every quoted example sentence.

    Record ids: ``data.noun:<offset>:def`` and ``data.noun:<offset>:ex<i>``.
    """

    kind = "wordnet"
    modality = "text"
    FILES = ("data.noun", "data.verb", "data.adj", "data.adv")
    _EXAMPLE = re.compile(r'"([^"]+)"')

    def __init__(self, name: str, root: str | Path, include: tuple[str, ...] = ("definitions", "examples")):
        super().__init__(name)
        self.root = Path(root).expanduser()
        self.include = include
        if not (self.root / "data.noun").exists():
            raise FileNotFoundError(f"wordnet source {name!r}: no data.noun under {self.root}")

    def units(self) -> list[Unit]:
        return [Unit(f, _file_fingerprint(self.root / f)) for f in self.FILES if (self.root / f).exists()]

    def read(self, units: list[Unit], max_file_bytes: int = 256 * 2**20) -> Iterator[TextRecord]:
        for u in units:
            with open(self.root / u.key, "rb") as f:
                for line in f:
                    if line.startswith(b"  ") or b" | " not in line:  # licence header
                        continue
                    offset = line.split(b" ", 1)[0].decode("ascii", "replace")
                    gloss = line.split(b" | ", 1)[1].decode("utf-8", "replace").strip()
                    examples = self._EXAMPLE.findall(gloss)
                    definition = self._EXAMPLE.sub("", gloss).strip(" ;")
                    if "definitions" in self.include and definition:
                        yield TextRecord(f"{u.key}:{offset}:def", definition)
                    if "examples" in self.include:
                        for i, ex in enumerate(examples):
                            yield TextRecord(f"{u.key}:{offset}:ex{i}", ex)


def gensim_news_path() -> Path:
    """The ~300 Lee news documents (one per line) that gensim ships as test data."""
    from gensim.test.utils import datapath

    return Path(datapath("lee_background.cor"))


# ------------------------------------------------------------------------------------------------ registry

SOURCE_KINDS: dict[str, type[Source]] = {
    cls.kind: cls
    for cls in (
        ImageDirSource,
        OpenClipArtSource,
        EasyVQASource,
        WebDatasetSource,
        ParquetImageSource,
        LineTextSource,
        JsonlTextSource,
        ParquetTextSource,
        WordNetSource,
    )
}


def build_source(kind: str, name: str, **options: Any) -> Source:
    """Instantiate a source by kind; unknown kinds and bad options raise ``ValueError`` with the choices."""
    if kind == "gensim_news":  # a documents source on the packaged file
        return LineTextSource(name, str(gensim_news_path()), documents=True)
    if kind == "documents":
        return LineTextSource(name, documents=True, **options)
    if kind not in SOURCE_KINDS:
        choices = sorted([*SOURCE_KINDS, "gensim_news", "documents"])
        raise ValueError(f"unknown source kind {kind!r}; choose one of {choices}")
    try:
        return SOURCE_KINDS[kind](name, **options)
    except TypeError as exc:
        raise ValueError(f"bad options for source {name!r} ({kind}): {exc}") from exc
