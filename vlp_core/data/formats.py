"""Readers for the real file formats of the downstream vision-language datasets, each returning a
:class:`~vlp_core.data.examples.ReadResult` of :class:`~vlp_core.data.examples.TaskExample` and
:class:`~vlp_core.data.examples.TaskReject`.

Common rules
------------
- A bad record never raises: it becomes a reject (``source`` = the file's name, ``input_id`` = the record's
  own id, or ``line N`` / a position where it has none, a short ``reason`` and a ``detail`` sentence) and
  reading goes on. A file that cannot be read at all (missing, not JSON at the top level, a refs pickle
  holding anything but plain data) raises :class:`FileNotFoundError` / :class:`ValueError` naming the file.
- Reasons shared by every reader: ``missing_field`` (a required key absent or null), ``bad_field`` (a
  required value of the wrong type, e.g. a number where text is expected), ``bad_record`` (a record that is
  not a JSON object / dict), ``empty_text`` (the text is empty once stripped) and ``duplicate_id`` (an
  ``example_id`` already read in the same split: the first one is kept, as ids must be unique within
  (task, split)).
- Text is stripped of surrounding white space. Splits keep the dataset's own names. Ids are kept as the
  dataset writes them (as strings). ``meta`` values are strings; a meta key is left out when the record
  does not have it.
- JSON-lines files are read line by line as UTF-8 (a leading byte-order mark is allowed); blank lines are
  skipped silently (a trailing newline is not a record); a line that is not JSON (or not UTF-8) is a
  ``bad_json`` reject. Line numbers count from 1.
- Image references are paths relative to the dataset's image root, built from the record as the datasets'
  own loaders do; nothing is checked on disk (the readers touch only the files they are given).
- Only the standard library is imported: the module is cheap to import and the readers are pure (same
  files, same result).

NLVR2 (:func:`read_nlvr2`)
--------------------------
``train.json`` / ``dev.json`` / ``test1.json`` of lil-lab/nlvr (``nlvr2/data``): JSON lines with
``identifier`` (``"<split>-<a>-<b>-<c>"``, e.g. ``"train-10171-0-0"``), ``sentence``, ``label``
(``"True"`` / ``"False"``), ``synset``, ``query``, ``left_url``, ``right_url``, ``writer``, ... and, in
train only, ``directory`` (an int). Task ``nlvr2``; ``example_id`` = the identifier; ``label`` ``"true"`` /
``"false"`` (:data:`~vlp_core.data.examples.NLVR2_LABELS`; the strings are matched case-insensitively and
JSON booleans are accepted too); ``meta`` keeps ``synset`` and ``query``. The image pair is
``<split>-<a>-<b>-img0.png`` and ``-img1.png``, in ``train/<directory>/`` for train and ``<split>/``
otherwise, where ``<split>`` is the identifier's prefix: the ``split`` argument names the examples' split
but not the image folder, so e.g. ``balanced/balanced_dev.json`` read with ``split="balanced_dev"`` still
points at ``dev/``. The split is the argument, else the identifier's prefix. Rejects: ``bad_json``,
``bad_record``, ``missing_field`` (also a train record without ``directory``), ``bad_field`` (e.g. a
``directory`` that is not an integer), ``bad_identifier`` (not ``<split>-<int>-<int>-<int>``),
``bad_label``, ``empty_text``, ``duplicate_id``.

SNLI-VE (:func:`read_snli_ve`)
------------------------------
``snli_ve_train.jsonl`` / ``snli_ve_dev.jsonl`` / ``snli_ve_test.jsonl`` of necla-ml/SNLI-VE: JSON lines
with ``Flikr30kID`` (sic, e.g. ``"2248275918.jpg"``), ``gold_label``, ``sentence1`` (the premise: a
Flickr30k caption of the image), ``sentence2`` (the hypothesis), ``pairID``, ``captionID`` and the parses.
Task ``snli-ve``; the split is the argument, else ``<split>`` of the file name ``snli_ve_<split>.jsonl``
(another file name without a ``split`` argument is a :class:`ValueError`); ``example_id`` = ``pairID``;
``images`` = ``(Flikr30kID,)`` with ``.jpg`` added where it is missing; ``text`` = ``sentence2``;
``label`` = ``gold_label`` (lower-cased; one of
:data:`~vlp_core.data.examples.ENTAILMENT_LABELS`); ``meta`` ``premise`` (``sentence1``) and
``caption_id``, which are optional. Rejects: ``bad_json``, ``bad_record``, ``missing_field``,
``bad_field``, ``bad_label`` (e.g. ``"-"``, SNLI's mark of no annotator consensus), ``empty_text``,
``duplicate_id``.

RefCOCO / RefCOCO+ / RefCOCOg (:func:`read_refcoco`)
----------------------------------------------------
``refs(unc).p`` (``refs(umd).p`` / ``refs(google).p`` for RefCOCOg) and ``instances.json`` of
lichengunc/refer. The refs file is a Python-2 pickle (protocol 2) of a list of dicts (``ref_id``,
``ann_id``, ``image_id``, ``split`` = ``train`` / ``val`` / ``testA`` / ``testB``, ``sentences`` =
``[{raw, sent, tokens, sent_id}]``, ``file_name``, ``category_id``, ``sent_ids``). It is loaded without
running any code: the unpickler refuses every global (plain lists, dicts, strings, numbers and tuples need
none), so a file holding anything else (an object, a function call) raises a :class:`ValueError` naming the
file and the refused global, and nothing it names is imported or called. Python-2 ``str`` values are loaded
as latin-1 (byte for byte); the sentence text is then re-decoded as UTF-8 where those bytes are valid UTF-8
(how Python 2 wrote non-ASCII text), else kept. A refs file ending in ``.json`` (a list of the same dicts,
for those who converted it) is read as JSON. ``instances.json`` is COCO style: ``images`` ``[{id,
file_name, width, height}]``, ``annotations`` ``[{id, image_id, bbox [x, y, w, h], category_id}]``,
``categories`` ``[{id, name}]``.

One example per (ref, sentence): task = ``dataset``; split = the ref's split; ``example_id`` =
``"<ref_id>-<sent_id>"``; ``images`` = ``("train2014/<file_name>",)`` with the image's ``file_name`` from
the instances (the refs' own ``file_name`` carries an annotation suffix and names no real file; RefCOCO
images are all COCO train2014); ``text`` = the sentence's ``sent`` (the lower-cased, tokenised form the
papers train on), else ``raw``; ``boxes`` = every usable annotation box of the image as ``x1, y1, x2, y2``
floats, sorted by annotation id (the ground-truth candidate setting); ``target`` = the index of the ref's
``ann_id`` in them; ``group`` = the ref id; ``meta`` ``category`` (name), ``category_id``, ``ann_id``,
``image_id``, ``width``, ``height``. Rejects of the instances file (``source`` = its name): ``bad_box`` (a
``bbox`` that is not four finite numbers, or whose width or height is not positive: the annotation is
dropped from every candidate list), ``missing_field``, ``bad_field`` (e.g. a non-integer annotation id),
``bad_record``, ``unknown_image`` (an annotation of an image the file does not list). Rejects of the refs
file (one per ref, ``input_id`` = the ref id; per sentence ``<ref_id>-<sent_id>``): ``bad_record``,
``missing_field``, ``bad_field``, ``unknown_image`` (``image_id`` not in the instances),
``unknown_annotation`` (``ann_id`` not among the image's annotations), ``bad_box`` (the ref's own annotation
was dropped as a bad box), ``empty_text``, ``duplicate_id``.

GQA (:func:`read_gqa`)
----------------------
``<split>_balanced_questions.json`` (and ``<split>_all_questions[_<n>].json``): one JSON object mapping
question id -> ``{imageId, question, answer, fullAnswer, types: {structural, semantic, detailed}, ...}``.
Task ``gqa``; the split is the argument, else ``<split>`` of such a file name (e.g. ``testdev``; another
file name without a ``split`` argument is a :class:`ValueError`); ``example_id`` = the question id;
``images`` = ``("<imageId>.jpg",)``; ``text`` = the question; ``label`` = the answer stripped and
lower-cased (GQA scores exact matches), ``None`` where the record has no answer (the unlabelled test and
challenge questions: not a reject); ``meta`` ``structural``, ``semantic``, ``detailed`` (from ``types``)
and ``full_answer``. Rejects: ``bad_record`` (a value that is not an object), ``missing_field``,
``bad_field`` (e.g. ``types`` that is not an object), ``empty_text``, ``bad_label`` (an answer that is
present but empty or not a string).

Karpathy splits (:func:`read_karpathy`)
---------------------------------------
``dataset_coco.json`` / ``dataset_flickr30k.json`` (/ ``dataset_flickr8k.json``): ``{"dataset": ...,
"images": [{filepath (COCO only, e.g. "val2014"), filename, imgid, split, sentences: [{raw, tokens,
sentid, imgid}], cocoid (COCO only), sentids}]}``. One example per sentence: task ``<dataset>-karpathy``
(the ``dataset`` argument, else the file's ``dataset`` key; neither is a :class:`ValueError`); split = the
image's split (``train`` / ``val`` / ``test`` / ``restval``, kept as is: whether ``restval`` trains is the
user's choice); ``example_id`` = the ``sentid``; ``images`` = ``("<filepath>/<filename>",)`` or
``("<filename>",)``; ``text`` = ``raw``; ``group`` = that image path (the retrieval key); ``meta``
``imgid`` and ``cocoid``. Rejects (per image, ``input_id`` = its path, else ``image N``; per sentence, the
``sentid``, else ``<image> sentence N``): ``bad_record``, ``missing_field``, ``bad_field``, ``no_captions``
(an image with no sentences), ``empty_text``, ``duplicate_id``.

Dispatch (:func:`read_task_file`)
---------------------------------
:data:`READERS` maps a kind (``nlvr2``, ``snli_ve``, ``refcoco``, ``gqa``, ``karpathy``) to its reader;
``read_task_file(kind, *paths, **kw)`` calls it.
"""

from __future__ import annotations

import io
import json
import math
import pickle
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from vlp_core.data.examples import ENTAILMENT_LABELS, NLVR2_LABELS, ReadResult, TaskExample

__all__ = [
    "READERS",
    "read_gqa",
    "read_karpathy",
    "read_nlvr2",
    "read_refcoco",
    "read_snli_ve",
    "read_task_file",
]

_NLVR2_ID = re.compile(r"^([^-/\\]+)-(\d+)-(\d+)-(\d+)$")
_SNLI_VE_FILE = re.compile(r"^snli_ve_(.+)\.jsonl$")
_GQA_FILE = re.compile(r"^(.+?)_(?:balanced|all)_questions(?:_\d+)?\.json$")


# ---------------------------------------------------------------------------------------------------------
# Shared plumbing


class _Bad(Exception):
    """A record's problem, raised by the per-record code and recorded by the reader's loop as a reject."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class _Sink:
    """Collects a reader's examples and rejects; refuses a second example with the same (split, id)."""

    def __init__(self) -> None:
        self.result = ReadResult()
        self._seen: set[tuple[str, str]] = set()

    def reject(self, source: str, input_id: Any, reason: str, detail: str) -> None:
        self.result.reject(source, input_id, reason, detail)

    def add(self, source: str, example: TaskExample) -> None:
        key = (example.split, example.example_id)
        if key in self._seen:
            self.reject(
                source,
                example.example_id,
                "duplicate_id",
                f"example id {example.example_id!r} appears again in split {example.split!r}; "
                "the first one is kept",
            )
            return
        self._seen.add(key)
        self.result.examples.append(example)


def _check_file(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    return path


def _load_json(path: Path, what: str) -> Any:
    """The whole file as JSON (UTF-8, byte-order mark allowed); a file that is not JSON is a ValueError."""
    try:
        return json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} file {path} is not valid JSON: {e}") from e


def _jsonl_objects(path: Path, sink: _Sink) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each JSON-object line; bad lines become rejects, blank lines are skipped."""
    source = path.name
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as e:
                sink.reject(source, f"line {n}", "bad_json", f"line {n} is not UTF-8: {e}")
                continue
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except ValueError as e:
                sink.reject(source, f"line {n}", "bad_json", f"line {n} is not JSON: {e}")
                continue
            if not isinstance(obj, dict):
                sink.reject(
                    source,
                    f"line {n}",
                    "bad_record",
                    f"line {n} is a JSON {type(obj).__name__}, not an object",
                )
                continue
            yield n, obj


def _required(record: dict[str, Any], key: str) -> Any:
    value = record.get(key)
    if value is None:
        raise _Bad("missing_field", f"the record has no {key!r}")
    return value


def _id(record: dict[str, Any], key: str) -> str:
    """A required id: a string or an integer, as a string."""
    return str(_key(record, key))


def _key(record: dict[str, Any], key: str) -> str | int:
    """A required lookup key (an image or annotation id): a string or an integer, kept as it is."""
    value = _required(record, key)
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise _Bad("bad_field", f"{key!r} is a {type(value).__name__}, not a string or integer")
    return value


def _text(record: dict[str, Any], key: str) -> str:
    """A required text: a string, stripped, not empty."""
    value = _required(record, key)
    if not isinstance(value, str):
        raise _Bad("bad_field", f"{key!r} is a {type(value).__name__}, not a string")
    text = value.strip()
    if not text:
        raise _Bad("empty_text", f"{key!r} is empty")
    return text


def _meta(record: dict[str, Any], keys: dict[str, str]) -> dict[str, str]:
    """``{meta key: str(record[record key])}`` for the record keys present and not null."""
    return {name: str(record[key]) for key, name in keys.items() if record.get(key) is not None}


def _id_or(record: Any, key: str, fallback: str) -> str:
    """The record's id for a reject, or ``fallback`` where it has none."""
    if isinstance(record, dict) and isinstance(record.get(key), str | int):
        return str(record[key])
    return fallback


# ---------------------------------------------------------------------------------------------------------
# NLVR2


def read_nlvr2(path: str | Path, split: str | None = None) -> ReadResult:
    """Read an NLVR2 JSON-lines file (``train.json``, ``dev.json``, ``test1.json`` of lil-lab/nlvr).

    Args:
        path: the file.
        split: the examples' split; by default each identifier's prefix (``train``, ``dev``, ``test1``).

    Returns:
        One ``nlvr2`` example per statement (images: the left and right image paths under the NLVR2 image
        root, label ``"true"`` / ``"false"``) and a reject per bad line (see the module docstring).
    """
    path = _check_file(path, "NLVR2")
    sink = _Sink()
    for n, record in _jsonl_objects(path, sink):
        try:
            example = _nlvr2_example(record, split)
        except _Bad as bad:
            sink.reject(path.name, _id_or(record, "identifier", f"line {n}"), bad.reason, bad.detail)
        else:
            sink.add(path.name, example)
    return sink.result


def _nlvr2_example(record: dict[str, Any], split: str | None) -> TaskExample:
    identifier = _id(record, "identifier")
    match = _NLVR2_ID.match(identifier)
    if match is None:
        raise _Bad("bad_identifier", f"identifier {identifier!r} is not <split>-<int>-<int>-<int>")
    prefix = match.group(1)
    stem = f"{prefix}-{match.group(2)}-{match.group(3)}"
    if prefix == "train":
        directory = _required(record, "directory")
        if isinstance(directory, bool) or not (
            isinstance(directory, int)
            or (isinstance(directory, str) and directory.isascii() and directory.isdigit())
        ):
            raise _Bad("bad_field", f"directory {directory!r} is not an integer")
        folder = f"train/{int(directory)}"
    else:
        folder = prefix
    text = _text(record, "sentence")
    raw_label = _required(record, "label")
    label = str(raw_label).strip().lower() if isinstance(raw_label, str | bool) else None
    if label not in NLVR2_LABELS:
        raise _Bad("bad_label", f"label {raw_label!r} is not True / False")
    return TaskExample(
        task="nlvr2",
        split=split or prefix,
        example_id=identifier,
        images=(f"{folder}/{stem}-img0.png", f"{folder}/{stem}-img1.png"),
        text=text,
        label=label,
        meta=_meta(record, {"synset": "synset", "query": "query"}),
    )


# ---------------------------------------------------------------------------------------------------------
# SNLI-VE


def read_snli_ve(path: str | Path, split: str | None = None) -> ReadResult:
    """Read an SNLI-VE JSON-lines file (``snli_ve_train.jsonl``, ``snli_ve_dev.jsonl``, ``snli_ve_test.jsonl``
    of necla-ml/SNLI-VE).

    Args:
        path: the file.
        split: the examples' split; by default ``<split>`` of the file name ``snli_ve_<split>.jsonl``.

    Returns:
        One ``snli-ve`` example per hypothesis (image: the Flickr30k premise image, text: the hypothesis,
        label: entailment / neutral / contradiction) and a reject per bad line.

    Raises:
        ValueError: no ``split`` given and the file name is not ``snli_ve_<split>.jsonl``.
    """
    path = _check_file(path, "SNLI-VE")
    if split is None:
        match = _SNLI_VE_FILE.match(path.name)
        if match is None:
            raise ValueError(f"cannot tell the split of SNLI-VE file {path}: pass split= explicitly")
        split = match.group(1)
    sink = _Sink()
    for n, record in _jsonl_objects(path, sink):
        try:
            example = _snli_ve_example(record, split)
        except _Bad as bad:
            sink.reject(path.name, _id_or(record, "pairID", f"line {n}"), bad.reason, bad.detail)
        else:
            sink.add(path.name, example)
    return sink.result


def _snli_ve_example(record: dict[str, Any], split: str) -> TaskExample:
    pair_id = _id(record, "pairID")
    image = _id(record, "Flikr30kID").strip()
    if not image:
        raise _Bad("missing_field", "'Flikr30kID' is empty")
    if not image.lower().endswith(".jpg"):
        image += ".jpg"
    text = _text(record, "sentence2")
    raw_label = _required(record, "gold_label")
    label = raw_label.strip().lower() if isinstance(raw_label, str) else raw_label
    if label not in ENTAILMENT_LABELS:
        raise _Bad("bad_label", f"gold_label {raw_label!r} is not one of {', '.join(ENTAILMENT_LABELS)}")
    meta = _meta(record, {"sentence1": "premise", "captionID": "caption_id"})
    if "premise" in meta:
        meta["premise"] = meta["premise"].strip()
    return TaskExample(
        task="snli-ve", split=split, example_id=pair_id, images=(image,), text=text, label=label, meta=meta
    )


# ---------------------------------------------------------------------------------------------------------
# RefCOCO / RefCOCO+ / RefCOCOg


class _PlainDataUnpickler(pickle.Unpickler):
    """An unpickler for plain data only: every global (class, function) is refused, so loading can neither
    import nor call anything. Lists, dicts, strings, bytes strings of Python 2, numbers, tuples, booleans
    and None need no global."""

    def find_class(self, module: str, name: str) -> Any:
        raise _ForbiddenGlobal(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        raise _ForbiddenGlobal(f"persistent id {pid!r}")


class _ForbiddenGlobal(pickle.UnpicklingError):
    pass


def _load_plain_pickle(path: Path) -> Any:
    """Unpickle plain data (Python-2 ``str`` as latin-1) from ``path``; anything else is a ValueError."""
    try:
        return _PlainDataUnpickler(io.BytesIO(path.read_bytes()), encoding="latin1").load()
    except _ForbiddenGlobal as e:
        raise ValueError(
            f"refs file {path} holds more than plain data: refused to load the global {e} "
            "(only lists, dicts, strings and numbers are read; nothing was imported or called)"
        ) from e
    except Exception as e:  # a truncated or corrupt pickle raises many kinds of errors
        raise ValueError(f"refs file {path} is not a readable pickle: {type(e).__name__}: {e}") from e


def _py2_text(value: str) -> str:
    """Undo latin-1 loading of a Python-2 ``str`` holding UTF-8 bytes; other strings are kept as they are."""
    if value.isascii():
        return value
    try:
        return value.encode("latin1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return value


def _load_refs(path: Path) -> list[Any]:
    refs = _load_json(path, "refs") if path.suffix.lower() == ".json" else _load_plain_pickle(path)
    if not isinstance(refs, list):
        raise ValueError(f"refs file {path} holds a {type(refs).__name__}, not a list of refs")
    return refs


def _xyxy(bbox: Any) -> tuple[float, float, float, float]:
    """A COCO ``[x, y, w, h]`` box as ``x1, y1, x2, y2`` floats; a malformed or empty box is ``bad_box``."""
    if (
        not isinstance(bbox, list | tuple)
        or len(bbox) != 4
        or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in bbox)
    ):
        raise _Bad("bad_box", f"bbox {bbox!r} is not four numbers [x, y, w, h]")
    x, y, w, h = (float(v) for v in bbox)
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        raise _Bad("bad_box", f"bbox {bbox!r} is not finite")
    if not (w > 0 and h > 0):
        raise _Bad("bad_box", f"bbox {bbox!r} has a width or height that is not positive")
    return (x, y, x + w, y + h)


class _Instances:
    """The COCO instances file indexed by image: images, their usable boxes by annotation id, categories."""

    def __init__(self, path: Path, sink: _Sink) -> None:
        data = _load_json(path, "instances")
        if not isinstance(data, dict) or not all(
            isinstance(data.get(k), list) for k in ("images", "annotations")
        ):
            raise ValueError(
                f"instances file {path} is not COCO instances (no 'images' and 'annotations' lists)"
            )
        source = path.name
        self.images: dict[Any, dict[str, Any]] = {}
        for i, image in enumerate(data["images"]):
            try:
                if not isinstance(image, dict):
                    raise _Bad("bad_record", f"images[{i}] is not an object")
                image_id = _key(image, "id")
                _text(image, "file_name")
            except _Bad as bad:
                sink.reject(source, f"image {_id_or(image, 'id', f'#{i}')}", bad.reason, bad.detail)
            else:
                self.images[image_id] = image
        self.boxes: dict[Any, dict[int, tuple[float, float, float, float]]] = {}
        self.ann_image: dict[int, Any] = {}
        self.ann_category: dict[int, Any] = {}
        self.bad_boxes: set[int] = set()
        for i, ann in enumerate(data["annotations"]):
            try:
                if not isinstance(ann, dict):
                    raise _Bad("bad_record", f"annotations[{i}] is not an object")
                ann_id = _required(ann, "id")
                if isinstance(ann_id, bool) or not isinstance(ann_id, int):
                    raise _Bad("bad_field", f"annotation id {ann_id!r} is not an integer")
                image_id = _key(ann, "image_id")
                if image_id not in self.images:
                    raise _Bad("unknown_image", f"annotation {ann_id} is of image {image_id!r}, not listed")
                self.ann_image[ann_id] = image_id
                try:
                    box = _xyxy(_required(ann, "bbox"))
                except _Bad:
                    self.bad_boxes.add(ann_id)
                    raise
            except _Bad as bad:
                sink.reject(source, f"annotation {_id_or(ann, 'id', f'#{i}')}", bad.reason, bad.detail)
            else:
                self.boxes.setdefault(image_id, {})[ann_id] = box
                self.ann_category[ann_id] = ann.get("category_id")
        self.categories: dict[Any, str] = {}
        for category in data.get("categories") or ():
            if (
                isinstance(category, dict)
                and isinstance(category.get("id"), str | int)
                and category.get("name")
            ):
                self.categories[category["id"]] = str(category["name"])


def read_refcoco(refs_path: str | Path, instances_path: str | Path, dataset: str = "refcoco+") -> ReadResult:
    """Read a RefCOCO-family dataset: ``refs(unc).p`` (or a ``.json`` list of the same refs) and the COCO
    ``instances.json`` of lichengunc/refer.

    Args:
        refs_path: the refs pickle (loaded without running code: any global is refused) or ``.json`` file.
        instances_path: the dataset's ``instances.json``.
        dataset: the task name of the examples (``refcoco``, ``refcoco+``, ``refcocog``).

    Returns:
        One example per (ref, sentence) with every usable ground-truth box of the image as candidates and
        the ref's box as target, and the rejects of both files (see the module docstring).

    Raises:
        FileNotFoundError: a file is missing.
        ValueError: the refs pickle holds anything but plain data, or a file is not readable at all.
    """
    refs_path = _check_file(refs_path, "refs")
    instances_path = _check_file(instances_path, "instances")
    refs = _load_refs(refs_path)
    sink = _Sink()
    instances = _Instances(instances_path, sink)
    source = refs_path.name
    for i, ref in enumerate(refs):
        ref_key = _id_or(ref, "ref_id", f"ref #{i}")
        try:
            candidates, target, meta, image_path, sentences = _refcoco_ref(ref, instances)
        except _Bad as bad:
            sink.reject(source, ref_key, bad.reason, bad.detail)
            continue
        for j, sentence in enumerate(sentences):
            sent_key = f"{ref_key}-{_id_or(sentence, 'sent_id', f'#{j}')}"
            try:
                if not isinstance(sentence, dict):
                    raise _Bad("bad_record", f"sentence {j} is not a dict")
                sent_id = _id(sentence, "sent_id")
                text = _refcoco_text(sentence)
            except _Bad as bad:
                sink.reject(source, sent_key, bad.reason, bad.detail)
                continue
            sink.add(
                source,
                TaskExample(
                    task=dataset,
                    split=str(ref["split"]),
                    example_id=f"{ref_key}-{sent_id}",
                    images=(image_path,),
                    text=text,
                    boxes=candidates,
                    target=target,
                    group=ref_key,
                    meta=dict(meta),
                ),
            )
    return sink.result


def _refcoco_ref(
    ref: Any, instances: _Instances
) -> tuple[tuple[tuple[float, float, float, float], ...], int, dict[str, str], str, list[Any]]:
    """A ref's candidates, target index, meta, image path and sentences, or the reason it is unusable."""
    if not isinstance(ref, dict):
        raise _Bad("bad_record", f"the ref is a {type(ref).__name__}, not a dict")
    _id(ref, "ref_id")
    ann_id = _key(ref, "ann_id")
    image_id = _key(ref, "image_id")
    _id(ref, "split")
    sentences = _required(ref, "sentences")
    if not isinstance(sentences, list):
        raise _Bad("bad_field", f"'sentences' is a {type(sentences).__name__}, not a list")
    image = instances.images.get(image_id)
    if image is None:
        raise _Bad("unknown_image", f"image {image_id!r} is not in the instances file")
    if ann_id in instances.bad_boxes:
        raise _Bad("bad_box", f"the ref's annotation {ann_id!r} has a bad box (see its reject)")
    boxes = instances.boxes.get(image_id, {})
    if ann_id not in boxes:
        where = instances.ann_image.get(ann_id)
        detail = f"annotation {ann_id!r} is not among image {image_id!r}'s annotations"
        raise _Bad(
            "unknown_annotation", detail + (f" (it is of image {where!r})" if where is not None else "")
        )
    order = sorted(boxes)
    category_id = ref.get("category_id")
    if category_id is None:
        category_id = instances.ann_category.get(ann_id)
    meta = {"ann_id": str(ann_id), "image_id": str(image_id)}
    if category_id is not None:
        meta["category_id"] = str(category_id)
        if isinstance(category_id, str | int) and category_id in instances.categories:
            meta["category"] = instances.categories[category_id]
    meta.update(_meta(image, {"width": "width", "height": "height"}))
    image_path = f"train2014/{image['file_name'].strip()}"
    return tuple(boxes[a] for a in order), order.index(ann_id), meta, image_path, sentences


def _refcoco_text(sentence: dict[str, Any]) -> str:
    """The sentence's ``sent``, else its ``raw``, Python-2 bytes re-decoded, stripped and not empty."""
    values = [sentence.get(k) for k in ("sent", "raw")]
    if all(v is None for v in values):
        raise _Bad("missing_field", "the sentence has neither 'sent' nor 'raw'")
    for value in values:
        if isinstance(value, str) and value.strip():
            return _py2_text(value.strip())
    raise _Bad("empty_text", "the sentence's 'sent' and 'raw' are empty")


# ---------------------------------------------------------------------------------------------------------
# GQA


def read_gqa(questions_path: str | Path, split: str | None = None) -> ReadResult:
    """Read a GQA questions file (``train_balanced_questions.json``, ``testdev_balanced_questions.json``,
    ...).

    Args:
        questions_path: the file: one JSON object mapping question id to question.
        split: the examples' split; by default ``<split>`` of the file name
            ``<split>_balanced_questions.json`` / ``<split>_all_questions[_<n>].json``.

    Returns:
        One ``gqa`` example per question (label: the answer, lower-cased; ``None`` where the question has
        no answer) and a reject per bad question (see the module docstring).

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: the file is not a JSON object, or no split is given and the file name does not tell it.
    """
    path = _check_file(questions_path, "GQA questions")
    if split is None:
        match = _GQA_FILE.match(path.name)
        if match is None:
            raise ValueError(f"cannot tell the split of GQA file {path}: pass split= explicitly")
        split = match.group(1)
    data = _load_json(path, "GQA questions")
    if not isinstance(data, dict):
        raise ValueError(f"GQA questions file {path} holds a JSON {type(data).__name__}, not an object")
    sink = _Sink()
    for question_id, record in data.items():
        try:
            example = _gqa_example(question_id, record, split)
        except _Bad as bad:
            sink.reject(path.name, question_id, bad.reason, bad.detail)
        else:
            sink.add(path.name, example)
    return sink.result


def _gqa_example(question_id: str, record: Any, split: str) -> TaskExample:
    if not isinstance(record, dict):
        raise _Bad("bad_record", f"question {question_id!r} is a JSON {type(record).__name__}, not an object")
    image_id = _id(record, "imageId").strip()
    if not image_id:
        raise _Bad("missing_field", "'imageId' is empty")
    text = _text(record, "question")
    answer = record.get("answer")
    label = None
    if answer is not None:
        if not isinstance(answer, str) or not answer.strip():
            raise _Bad("bad_label", f"answer {answer!r} is not a non-empty string")
        label = answer.strip().lower()
    types = record.get("types")
    if types is None:
        types = {}
    if not isinstance(types, dict):
        raise _Bad("bad_field", f"'types' is a JSON {type(types).__name__}, not an object")
    meta = _meta(types, {"structural": "structural", "semantic": "semantic", "detailed": "detailed"})
    meta.update(_meta(record, {"fullAnswer": "full_answer"}))
    return TaskExample(
        task="gqa",
        split=split,
        example_id=question_id,
        images=(f"{image_id}.jpg",),
        text=text,
        label=label,
        meta=meta,
    )


# ---------------------------------------------------------------------------------------------------------
# Karpathy splits


def read_karpathy(path: str | Path, dataset: str | None = None) -> ReadResult:
    """Read a Karpathy split file (``dataset_coco.json``, ``dataset_flickr30k.json``).

    Args:
        path: the file.
        dataset: the dataset name for the task ``<dataset>-karpathy``; by default the file's ``dataset``.

    Returns:
        One example per caption (split: its image's split; group: its image's path) and the rejects (see
        the module docstring).

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: the file is not a JSON object with an ``images`` list, or names no dataset and none is
            given.
    """
    path = _check_file(path, "Karpathy split")
    data = _load_json(path, "Karpathy split")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"Karpathy split file {path} is not an object with an 'images' list")
    dataset = dataset or data.get("dataset")
    if not isinstance(dataset, str) or not dataset.strip():
        raise ValueError(f"Karpathy split file {path} names no dataset: pass dataset= explicitly")
    task = f"{dataset.strip()}-karpathy"
    source = path.name
    sink = _Sink()
    for i, image in enumerate(data["images"]):
        image_key = f"image {i}"
        try:
            if not isinstance(image, dict):
                raise _Bad("bad_record", f"images[{i}] is a JSON {type(image).__name__}, not an object")
            filename = _text(image, "filename")
            filepath = image.get("filepath")
            if filepath is not None and not isinstance(filepath, str):
                raise _Bad("bad_field", f"'filepath' is a {type(filepath).__name__}, not a string")
            image_key = (
                f"{filepath.strip().rstrip('/')}/{filename}" if filepath and filepath.strip() else filename
            )
            split = _id(image, "split")
            sentences = image.get("sentences")
            if sentences is not None and not isinstance(sentences, list):
                raise _Bad("bad_field", f"'sentences' is a {type(sentences).__name__}, not a list")
            if not sentences:
                raise _Bad("no_captions", f"image {image_key} has no sentences")
        except _Bad as bad:
            sink.reject(source, image_key, bad.reason, bad.detail)
            continue
        meta = _meta(image, {"imgid": "imgid", "cocoid": "cocoid"})
        for j, sentence in enumerate(sentences):
            sent_key = _id_or(sentence, "sentid", f"{image_key} sentence {j}")
            try:
                if not isinstance(sentence, dict):
                    raise _Bad("bad_record", f"sentence {j} of {image_key} is not an object")
                example = TaskExample(
                    task=task,
                    split=split,
                    example_id=_id(sentence, "sentid"),
                    images=(image_key,),
                    text=_text(sentence, "raw"),
                    group=image_key,
                    meta=dict(meta),
                )
            except _Bad as bad:
                sink.reject(source, sent_key, bad.reason, bad.detail)
            else:
                sink.add(source, example)
    return sink.result


# ---------------------------------------------------------------------------------------------------------
# Dispatch

#: the reader of each kind of task file.
READERS: dict[str, Callable[..., ReadResult]] = {
    "nlvr2": read_nlvr2,
    "snli_ve": read_snli_ve,
    "refcoco": read_refcoco,
    "gqa": read_gqa,
    "karpathy": read_karpathy,
}


def read_task_file(kind: str, *paths: str | Path, **kw: Any) -> ReadResult:
    """Read task files of ``kind`` with its reader in :data:`READERS`: ``read_task_file("refcoco", refs,
    instances, dataset="refcoco+")`` is ``read_refcoco(refs, instances, dataset="refcoco+")``.

    Raises:
        ValueError: ``kind`` is not one of :data:`READERS`' kinds.
    """
    reader = READERS.get(kind)
    if reader is None:
        raise ValueError(f"unknown task file kind {kind!r}; the kinds are: {', '.join(READERS)}")
    return reader(*paths, **kw)
