"""The corpus half of the library: everything that turns an image collection and a text corpus into the
weakly-aligned training corpus, as pure functions that ``flows/build_corpus.py`` orchestrates.

- ``sources``: readers of every input kind (image folders, clip art, easy-VQA, webdataset tars, Parquet,
  text lines, WordNet, news), yielding units with fingerprints;
- ``images``: safe image decoding (every input a normalised RGB image or a reject reason);
- ``text``: text cleaning and its reject reasons;
- ``ingest``: the ingest stage (rows and rejects of one shard);
- ``stages``: the rows of every later stage (regions, embed, retrieve, phrases, links, gallery, ground)
  and the per-process model caches they share;
- ``quality``: corpus quality against random pairs;
- ``assets``: fetching the bundled real data and model files.

The models these stages run (detector, region features, Sentence-BERT, noun phrases, linking, grounding) live
in ``vlp_core.vision`` and ``vlp_core.language``, which the training half uses too.
"""
