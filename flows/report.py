"""The corpus quality report: measured alignment / category agreement beside random-pairing baselines, tag
coverage, link rate and rejects; published as Prefect artifacts and written as an HTML page with a retrieval
gallery (``vlp report``)."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

from stores.catalog import connect
from vlp_core.corpus.quality import random_alignment_at_k, random_category_at_k, random_category_precision
from vlp_core.paths import DataLayout


def _rows(con, sql: str, params: list | None = None) -> list[dict[str, Any]]:
    rel = con.execute(sql, params or [])
    cols = [d[0] for d in rel.description]
    return [dict(zip(cols, r, strict=True)) for r in rel.fetchall()]


def quality_metrics(layout: DataLayout) -> dict[str, Any]:
    """Measured metrics (SQL views ``corpus_quality``, ``retrieval_eval``) and their random baselines."""
    con = connect(layout.catalog)
    try:
        (q,) = _rows(con, "SELECT * FROM corpus_quality")
        k = con.execute("SELECT coalesce(max(rank), 0) FROM retrieved_pairs").fetchone()[0]
        n_texts = con.execute("SELECT count(*) FROM texts").fetchone()[0]
        per_image = con.execute("SELECT n_own, category FROM retrieval_eval").fetchall()
        share = dict(con.execute(
            "SELECT category, count(DISTINCT text_id) / (SELECT count(*) FROM texts) FROM text_categories "
            "GROUP BY category"
        ).fetchall())  # fmt: skip
        coverage = _rows(con, "SELECT * FROM tag_coverage")
        rejects = _rows(
            con, "SELECT stage, reason, sum(n) AS n FROM rejects_by_reason GROUP BY ALL ORDER BY n DESC"
        )
        cmc = _rows(con, "SELECT * FROM cmc_coverage")
    finally:
        con.close()
    cats = [c for _, c in per_image if c is not None]
    q.update(
        k=k,
        corpus_sentences=n_texts,
        random_alignment_at_1=random_alignment_at_k([n for n, _ in per_image], n_texts, 1),
        random_alignment_at_k=random_alignment_at_k([n for n, _ in per_image], n_texts, k),
        random_category_at_k=random_category_at_k(cats, share, k),
        random_category_precision_at_k=random_category_precision(cats, share),
    )
    whole = next((r for r in cmc if r["origin"] == "all"), {})
    q.update({f"cmc_{k}": whole.get(k) for k in CMC_KEYS})
    return {"quality": q, "tag_coverage": coverage, "rejects": rejects, "cmc_coverage": cmc}


# cmc_coverage columns carried into the quality summary as cmc_<column> (the whole gallery's row)
CMC_KEYS = ("grounded_sentences", "grounded_share", "grounded_words", "expected_replaced_words",
            "expected_replaced_share")  # fmt: skip


def _thumb(jpeg: bytes, side: int = 128) -> str:
    from vlp_core.corpus.images import load_rgb

    im = load_rgb(jpeg)
    im.thumbnail((side, side))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=80)
    return base64.b64encode(buf.getvalue()).decode()


def write_html(layout: DataLayout, path: Path, metrics: dict[str, Any], n_examples: int = 30) -> Path:
    """An HTML page: metrics vs random, tag coverage, rejects, and a retrieval gallery of sample images."""
    con = connect(layout.catalog)
    try:
        sample = _rows(con, "SELECT DISTINCT image_id FROM retrieved_pairs ORDER BY hash(image_id) LIMIT ?",
                       [n_examples])  # fmt: skip
        cards = []
        for s in sample:
            img = _rows(con, "SELECT uri, category, image FROM images WHERE image_id = ?", [s["image_id"]])[0]
            tags = _rows(con, "SELECT tag_sentence FROM image_tags WHERE image_id = ?", [s["image_id"]])
            hits = _rows(
                con,
                "SELECT rank, score, text, own_caption FROM retrieval_browser "
                "WHERE image_id = ? ORDER BY rank",
                [s["image_id"]],
            )
            items = "".join(
                f"<li{' class=own' if h['own_caption'] else ''}>{h['score']:.3f} {html.escape(h['text'])}"
                "</li>"
                for h in hits
            )
            cards.append(
                f"<div class=card><img src='data:image/jpeg;base64,{_thumb(img['image'])}'>"
                f"<p><b>{html.escape(str(img['category']))}</b> · tags: <i>"
                f"{html.escape(tags[0]['tag_sentence'] if tags else '')}</i></p><ol>{items}</ol>"
                f"<p class=uri>{html.escape(img['uri'][-70:])}</p></div>"
            )
    finally:
        con.close()
    q = metrics["quality"]
    rows = [
        ("alignment@1 (own caption ranked first)", q["alignment_at_1"], q["random_alignment_at_1"]),
        (f"alignment@{q['k']} (own caption in top-K)", q["alignment_at_k"], q["random_alignment_at_k"]),
        (
            f"category@{q['k']} (a same-category sentence in top-K)",
            q["category_at_k"],
            q["random_category_at_k"],
        ),
        (f"category precision@{q['k']}", q["category_precision_at_k"], q["random_category_precision_at_k"]),
    ]
    table = "".join(f"<tr><td>{name}</td><td>{_fmt(v)}</td><td>{_fmt(r)}</td></tr>" for name, v, r in rows)
    cov = "".join(f"<tr><td>{c['source']}</td><td>{c['images']}</td><td>{_fmt(c['coverage'])}</td></tr>"
                  for c in metrics["tag_coverage"])  # fmt: skip
    rej = "".join(
        f"<tr><td>{r['stage']}</td><td>{r['reason']}</td><td>{r['n']}</td></tr>" for r in metrics["rejects"]
    )
    cmc_cols = ("origin", "sentences", "grounded_sentences", "grounded_share", "grounded_words",
                "expected_replaced_words", "words", "expected_replaced_share")  # fmt: skip
    cmc = "".join(
        "<tr>"
        + "".join(f"<td>{f'{r[c]:.2%}' if c.endswith('share') else _fmt(r[c])}</td>" for c in cmc_cols)
        + "</tr>"
        for r in metrics.get("cmc_coverage", [])
    )
    cmc_head = "".join(f"<th>{c.replace('_', ' ')}</th>" for c in cmc_cols)
    page = f"""<!doctype html><html><head><meta charset=utf-8><title>Corpus quality</title><style>
body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse;margin-bottom:1.5em}}
td,th{{border:1px solid #ccc;padding:4px 8px}} .card{{display:inline-block;vertical-align:top;width:330px;
margin:6px;padding:6px;border:1px solid #ddd}} .card img{{max-width:128px;max-height:128px}}
li{{font-size:12px}} li.own{{background:#dfd}} .uri{{font-size:10px;color:#888}}</style></head><body>
<h1>Corpus quality</h1><p>{q["images_evaluated"]} images with known captions evaluated; retrieval over
{q["corpus_sentences"]} sentences; link rate {_fmt(q["link_rate"])}; rejects {q["rejects"]}.</p>
<table><tr><th>metric</th><th>retrieved</th><th>random pairs</th></tr>{table}</table>
<h2>Tag coverage</h2><table><tr><th>source</th><th>images</th><th>coverage</th></tr>{cov}</table>
<h2>CutMix (CMC) coverage</h2><p>Sentences with a visually grounded word (a gallery concept) and the words
cross-modal CutMix replaces in expectation (p = 0.5 per grounded word, at least one per sentence), per patch
origin.</p><table><tr>{cmc_head}</tr>{cmc}</table>
<h2>Rejects</h2><table><tr><th>stage</th><th>reason</th><th>n</th></tr>{rej}</table>
<h2>Retrieval gallery</h2><p>Green: the image's own caption (known pair; never used to build the corpus).</p>
{"".join(cards)}</body></html>"""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page)
    return path


def _fmt(v: Any) -> str:
    return "–" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)
