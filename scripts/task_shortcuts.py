"""How much of each bundled classification task one modality gives away, measured with oracles rather than
models: a classifier that sees only the text, and one that sees only a perfect reading of the image(s).

- **text only**: word 1-2-grams of the statement / hypothesis / question -> logistic regression.
- **image only, perfect perception**: per scene, the exact number of objects, shapes, clip-art objects,
  each shape, each colour's shapes, each noun, and whether there is an occluder (read from the scenes'
  metadata, so no perception error) -> gradient-boosted trees.

Both train on the task's train split and are scored on its test split, next to the chance level (always
the most frequent test label). A task that needs both modalities has both oracles near chance; a full
model's accuracy above them is what the pairing of text and image adds. The oracles bound what a
single-modality *model* can learn from these features only loosely (a model may see other cues, e.g.
sprite styles), which is why the benchmark's ``<method>:text-only`` / ``<method>:image-only`` runs exist too.

    .venv/bin/python scripts/task_shortcuts.py            # the built tasks in the data directory's store

Reads the examples from the store (build them first: ``vlp build-tasks``).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np

from stores.shards import ShardStore
from vlp_core.data.scenes import COLORS, NOUNS, SCENE_TASKS, SHAPES
from vlp_core.data.task_data import read_task_examples, task_splits
from vlp_core.paths import DataLayout

#: the classification-shaped bundled tasks and their test split (``scene-pairs-easy`` when built).
TASKS = {"scene-pairs": "test", "scene-pairs-easy": "test", "scene-entailment": "test", "scene-qa": "test"}


def scene_features(scene: dict) -> list[int]:
    objs = scene["objects"]
    f = [len(objs), sum(o["kind"] == "shape" for o in objs), sum(o["kind"] == "clipart" for o in objs)]
    f += [sum(o["kind"] == "shape" and o["name"] == s for o in objs) for s in SHAPES]
    f += [sum(o["color"] == c for o in objs) for c in COLORS]
    f += [sum(o["kind"] == "clipart" and o["name"] == n for o in objs) for n in NOUNS]
    return f + [int(scene.get("occluder") is not None)]


def oracles(store: ShardStore, task: str, test_split: str, seed: int = 0) -> dict[str, float]:
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression

    train, _ = read_task_examples(store, task, ["train"])
    test, _ = read_task_examples(store, task, [test_split])

    def labels(exs):
        return np.array([e.label for e in exs])

    def image(exs):
        return np.array([sum((scene_features(s) for s in json.loads(e.meta["scenes"])), []) for e in exs])

    y_train, y_test = labels(train), labels(test)
    vec = CountVectorizer(ngram_range=(1, 2), token_pattern=r"[A-Za-z-]+")
    text_clf = LogisticRegression(max_iter=2000, C=1.0, random_state=seed)
    text_clf.fit(vec.fit_transform([e.text for e in train]), y_train)
    text_acc = float((text_clf.predict(vec.transform([e.text for e in test])) == y_test).mean())
    img_clf = HistGradientBoostingClassifier(max_iter=200, random_state=seed).fit(image(train), y_train)
    img_acc = float((img_clf.predict(image(test)) == y_test).mean())
    chance = Counter(y_test.tolist()).most_common(1)[0][1] / len(y_test)
    return {"n_train": len(train), "n_test": len(test), "chance": chance, "text": text_acc, "image": img_acc}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=None, help="default: the project's data directory")
    args = ap.parse_args()
    layout = DataLayout(args.data_dir.resolve()) if args.data_dir else DataLayout.default()
    store = ShardStore(layout.store)
    head = ("task", "shape", "train", "test", "chance", "text only", "image only")
    print("{:22} {:8} {:>6} {:>6} {:>7} {:>10} {:>11}".format(*head))
    for task, split in TASKS.items():
        if not task_splits(store, task):
            print(f"{task:22} not built (vlp build-tasks), skipped")
            continue
        r = oracles(store, task, split)
        shape = SCENE_TASKS[task].shape
        print(
            f"{task:22} {shape:8} {r['n_train']:>6} {r['n_test']:>6} {100 * r['chance']:>6.1f}%"
            f" {100 * r['text']:>9.1f}% {100 * r['image']:>10.1f}%"
        )


if __name__ == "__main__":
    main()
