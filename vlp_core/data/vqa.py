"""Visual question answering data: VQA v2 (official JSON) and easy-VQA readers, answer normalisation, soft
scores, the answer vocabulary and the dataset.

Soft scores: an answer given by ``c`` of the (10) annotators scores ``min(c / 3, 1)``, the VQA accuracy of
predicting it (the official metric additionally averages over the 10 leave-one-annotator-out subsets, which
changes ``c = 1, 2, 3`` into 0.3, 0.6, 0.9; we keep the simple form, as the design fixes). Answers are
normalised with :func:`normalize_answer` before counting.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from vlp_core.data.sampler import sample_seed

__all__ = [
    "AnswerVocab",
    "VQADataset",
    "VQARecord",
    "load_image_file",
    "normalize_answer",
    "read_easy_vqa",
    "read_vqa_v2",
    "soft_score",
]

# The official evaluation's rules (VQA/PythonEvaluationTools/vqaEvaluation/vqaEval.py). Contractions: the
# common subset of its table (apostrophe-less spelling → spelling with apostrophe).
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's",
    "im": "i'm", "ive": "i've", "isnt": "isn't", "itd": "it'd", "itll": "it'll", "lets": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "oclock": "o'clock", "shant": "shan't", "shes": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "somebodys": "somebody's", "someones": "someone's", "thats": "that's",
    "theres": "there's", "theyd": "they'd", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "wasnt": "wasn't", "weve": "we've", "werent": "weren't", "whatre": "what're", "whats": "what's",
    "whens": "when's", "whered": "where'd", "wheres": "where's", "whos": "who's", "whove": "who've",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "yall": "y'all",
    "youd": "you'd", "youll": "you'll", "youre": "you're", "youve": "you've",
}  # fmt: skip
_NUMBERS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = {"a", "an", "the"}
_PUNCT = [
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
]
# The official pattern "(?!<=\d)(\.)(?!\d)" has a typo (a look-ahead, not a look-behind) and so removes every
# period not followed by a digit: "2.5" stays, "dr." → "dr", "5." → "5". We reproduce that behaviour.
_PERIOD = re.compile(r"\.(?!\d)")
_DIGIT_COMMA = re.compile(r"\d,\d")


def normalize_answer(answer: str) -> str:
    """The official VQA answer normalisation (as applied to both predictions and human answers).

    1. newlines/tabs → spaces, strip;
    2. punctuation: each of ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` is deleted if it touches a space
       (or if the answer contains a digit-comma-digit like "1,000"), else replaced by a space; then periods
       not followed by a digit are deleted;
    3. lower-case; number words zero–ten (and "none") → digits; articles a/an/the dropped; contractions
       restored ("dont" → "don't", a documented subset of the official table); single spaces.

    Examples: ``"Two "`` → ``"2"``; ``"The Dog!"`` → ``"dog"``; ``"1,000"`` → ``"1000"``; ``"t-shirt"`` →
    ``"t shirt"``; ``"yes."`` → ``"yes"``.
    """
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    out = text
    has_digit_comma = _DIGIT_COMMA.search(text) is not None
    for p in _PUNCT:
        if f"{p} " in text or f" {p}" in text or has_digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD.sub("", out)
    words = [_NUMBERS.get(w, w) for w in out.lower().split()]
    words = [_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words)


def soft_score(count: float) -> float:
    """VQA soft score of an answer given by ``count`` annotators: ``min(count / 3, 1)``."""
    return min(count / 3.0, 1.0)


@dataclass
class VQARecord:
    """One question.

    Attributes:
        question_id: unique id (VQA v2's ``question_id``; easy-VQA: the question's position in its split).
        image_id: the image's id in its dataset (COCO id, easy-VQA image number).
        image: what the dataset's ``image_loader`` opens: a path, relative (VQA v2:
            ``<data_subtype>/COCO_<data_subtype>_<image_id:012d>.jpg``) or absolute (easy-VQA).
        question: the question text.
        answers: the annotators' answers, normalised (empty for test questions).
        scores: soft score per distinct normalised answer.
        answer_type: ``yes/no`` | ``number`` | ``other`` (VQA v2 annotation; easy-VQA: yes/no or other).
        multiple_choice_answer: the most common answer, normalised (``None`` without annotations).
    """

    question_id: int
    image_id: int
    image: str
    question: str
    answers: list[str] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)
    answer_type: str | None = None
    multiple_choice_answer: str | None = None


def _scores(answers: Iterable[str]) -> dict[str, float]:
    return {a: soft_score(c) for a, c in sorted(Counter(answers).items())}


def read_vqa_v2(questions_json: str | Path, annotations_json: str | Path | None = None) -> list[VQARecord]:
    """Read the official VQA v2 files: ``v2_OpenEnded_mscoco_<subtype>_questions.json`` and (for train/val)
    ``v2_mscoco_<subtype>_annotations.json``. Records come in the questions file's order.

    The annotators' ``answer_confidence`` is ignored, as the official metric ignores it.
    """
    q = json.loads(Path(questions_json).read_text())
    subtype = q.get("data_subtype", "")
    anns: dict[int, dict[str, Any]] = {}
    if annotations_json is not None:
        for a in json.loads(Path(annotations_json).read_text())["annotations"]:
            anns[int(a["question_id"])] = a
    records = []
    for item in q["questions"]:
        qid, image_id = int(item["question_id"]), int(item["image_id"])
        rec = VQARecord(
            question_id=qid,
            image_id=image_id,
            image=f"{subtype}/COCO_{subtype}_{image_id:012d}.jpg",
            question=item["question"],
        )
        if annotations_json is not None:
            if qid not in anns:
                raise KeyError(f"question {qid} has no annotation in {annotations_json}")
            a = anns[qid]
            if int(a["image_id"]) != image_id:
                raise ValueError(
                    f"question {qid}: image {image_id} in questions, {a['image_id']} in annotations"
                )
            rec.answers = [normalize_answer(x["answer"]) for x in a["answers"]]
            rec.scores = _scores(rec.answers)
            rec.answer_type = a.get("answer_type")
            rec.multiple_choice_answer = normalize_answer(a["multiple_choice_answer"])
        records.append(rec)
    return records


def read_easy_vqa(split: str) -> list[VQARecord]:
    """The easy-VQA questions of ``split`` (``train``: 38,575 questions on 4,000 images; ``test``: 9,673 on
    1,000) from the installed ``easy_vqa`` package. One answer per question (score 1); ``image`` is the
    absolute path of the PNG; ``question_id`` is the question's position in the split."""
    import easy_vqa

    if split not in ("train", "test"):
        raise ValueError(f"easy-VQA split {split!r}: train | test")
    texts, answers, image_ids = getattr(easy_vqa, f"get_{split}_questions")()
    paths = getattr(easy_vqa, f"get_{split}_image_paths")()
    records = []
    for i, (question, answer, image_id) in enumerate(zip(texts, answers, image_ids, strict=True)):
        ans = normalize_answer(answer)
        records.append(
            VQARecord(
                question_id=i,
                image_id=int(image_id),
                image=paths[image_id],
                question=question,
                answers=[ans],
                scores={ans: 1.0},
                answer_type="yes/no" if ans in ("yes", "no") else "other",
                multiple_choice_answer=ans,
            )
        )
    return records


@dataclass
class AnswerVocab:
    """The classifier's answers: ``answers[i]`` is class ``i``.

    ``build`` keeps the ``top_k`` answers (3,129 is the usual VQA v2 size) by how many questions they have a
    non-zero soft score in (each question counts once per answer), ties broken alphabetically.
    """

    answers: list[str]

    def __post_init__(self) -> None:
        self._index = {a: i for i, a in enumerate(self.answers)}
        if len(self._index) != len(self.answers):
            raise ValueError("duplicate answers in the vocabulary")

    @classmethod
    def build(cls, records: Iterable[VQARecord], top_k: int = 3129, min_count: int = 1) -> AnswerVocab:
        counts: Counter = Counter()
        for r in records:
            counts.update(a for a, s in r.scores.items() if s > 0)
        ranked = sorted((a for a, c in counts.items() if c >= min_count), key=lambda a: (-counts[a], a))
        return cls(ranked[:top_k])

    def __len__(self) -> int:
        return len(self.answers)

    def __contains__(self, answer: str) -> bool:
        return answer in self._index

    def index(self, answer: str) -> int:
        return self._index[answer]

    def scores(self, record: VQARecord) -> torch.Tensor:
        """``(A,)`` float32 soft scores of ``record`` over the vocabulary (zeros for answers outside it)."""
        out = torch.zeros(len(self.answers), dtype=torch.float32)
        for a, s in record.scores.items():
            i = self._index.get(a)
            if i is not None:
                out[i] = s
        return out

    def coverage(self, records: Iterable[VQARecord]) -> float:
        """Fraction of questions whose best answer is in the vocabulary (the upper bound of accuracy)."""
        records = list(records)
        hit = sum(any(a in self._index for a in r.scores) for r in records if r.scores)
        return hit / max(1, sum(1 for r in records if r.scores))

    def to_dict(self) -> dict[str, Any]:
        return {"answers": list(self.answers)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AnswerVocab:
        return cls(list(d["answers"]))


def load_image_file(path: str | Path):
    """Open an image file as PIL RGB (fully decoded, so a broken file fails here, not in a transform)."""
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


class VQADataset(Dataset):
    """Map-style VQA samples. ``__getitem__(key)`` with key ``(epoch, index)`` (from a ResumableSampler) or a
    plain index (epoch 0) returns ``{"pixel_values": (3, S, S) float32, "question": str, "answer_scores":
    (A,) float32, "question_id": int, "sample_seed": int}``; ``transform`` runs under the per-sample seed
    exactly as in :class:`~vlp_core.data.pairs.PairDataset`.

    Args:
        records: the questions.
        vocab: the answer vocabulary (its size is ``A``).
        transform: PIL image → ``(3, S, S)`` tensor.
        image_loader: ``record.image`` → PIL RGB image (default: open it as a file path); with a relative
            ``image`` (VQA v2) pass e.g. ``lambda rel: load_image_file(coco_root / rel)``.
        seed: base of the per-sample seeds.
    """

    def __init__(
        self,
        records: list[VQARecord],
        vocab: AnswerVocab,
        transform: Callable[[Any], torch.Tensor],
        image_loader: Callable[[str], Any] = load_image_file,
        seed: int = 0,
    ):
        self.records = records
        self.vocab = vocab
        self.transform = transform
        self.image_loader = image_loader
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, Any]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        rec = self.records[int(index)]
        try:
            image = self.image_loader(rec.image)
        except Exception as exc:
            raise RuntimeError(
                f"question {rec.question_id}: image {rec.image!r} cannot be loaded: {exc}"
            ) from exc
        seed = sample_seed(self.seed, epoch, int(index))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            pixels = self.transform(image)
        return {
            "pixel_values": pixels,
            "question": rec.question,
            "answer_scores": self.vocab.scores(rec),
            "question_id": rec.question_id,
            "sample_seed": seed,
        }
