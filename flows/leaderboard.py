"""The leaderboard's page and chart, from the catalog's ``leaderboard_summary`` view: an HTML table (method x
task, headline metric mean ± std over seeds, the number of seeds, the chance level of each task's evaluation
split) and a PNG bar chart with the same numbers, under ``<data>/reports/``."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from stores.catalog import connect
from vlp_core.paths import DataLayout

__all__ = ["render"]

#: benchmark task -> (store task, evaluation split) whose chance level the chart marks (retrieval: the mean
#: recall of a random ranking, k / images averaged over k = 1, 5, 10).
CHANCE_OF = {
    "nlvr2": ("scene-pairs", "test"),
    "snli_ve": ("scene-entailment", "test"),
    "gqa": ("scene-qa", "test"),
    "retrieval": ("scene-captions", "test"),
    "retrieval-zs": ("scene-captions", "test"),
}


def _summary(layout: DataLayout, budget: str) -> tuple[list[dict[str, Any]], dict[str, float]]:
    with connect(layout.catalog) as db:
        cur = db.execute("SELECT * FROM leaderboard_summary WHERE budget = ?", [budget])
        cols = [d[0] for d in cur.description]
        rows = [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]
        chance: dict[str, float] = {}
        for task, (name, split) in CHANCE_OF.items():
            r = db.execute(
                "SELECT chance FROM task_summary WHERE task = ? AND split = ?", [name, split]
            ).fetchone()
            if r and r[0] is not None:
                chance[task] = 100 * float(r[0])
                if task.startswith("retrieval"):  # the headline is the mean of R@1, 5, 10 both ways
                    chance[task] *= (1 + 5 + 10) / 3
        ref = db.execute(
            "SELECT avg(1.0 / len(boxes)) FROM task_examples WHERE task = 'scene-refs' "
            "AND split IN ('val', 'testA', 'testB')"
        ).fetchone()
        if ref and ref[0] is not None:
            chance["refcoco"] = 100 * float(ref[0])
        held = db.execute(
            "SELECT max(value) FROM leaderboard "
            "WHERE task = 'clipart-zs' AND metric = 'n_images' AND budget = ?",
            [budget],
        ).fetchone()
        if held and held[0]:  # the held-out clip art: mean recall of a random ranking
            chance["clipart-zs"] = 100 * (1 + 5 + 10) / 3 / float(held[0])
    return rows, chance


def baseline_of(method: str) -> str | None:
    """The no-pre-training row a method is compared with: ``none:regions`` for the region methods (their
    backbone as it comes), ``none`` for the others; ``None`` for the baselines themselves and the
    single-modality / UniT variants (compared with their own full method instead)."""
    from vlp_core.recipes import RECIPES
    from vlp_core.recipes.base import default_backbone_kind

    base, _, variant = method.partition(":")
    if base == "none" or variant or base not in RECIPES or base == "unit":
        return None
    return "none:regions" if default_backbone_kind(base) == "region_stream" else "none"


def _delta_rows(rows: list[dict[str, Any]], tasks: list[str]) -> list[tuple[str, list[str]]]:
    """Per method with a baseline: its mean minus the baseline's per task, ± the standard error of that
    difference (sqrt(s1^2/n1 + s2^2/n2)); ``*`` where the difference exceeds twice it (both n >= 2)."""
    cell = {(r["method"], r["pairs_mode"], r["task"]): r for r in rows}
    base_of = {r["method"]: r for r in rows if r["method"] in ("none", "none:regions")}
    out = []
    for m in sorted({(r["method"], r["pairs_mode"]) for r in rows}):
        b = baseline_of(m[0])
        if b is None or b not in base_of:
            continue
        texts = []
        for t in tasks:
            r, z = cell.get((*m, t)), cell.get((b, "-", t))
            if r is None or z is None:
                texts.append("—")
                continue
            d = r["mean"] - z["mean"]
            se = (r["std"] ** 2 / r["seeds"] + z["std"] ** 2 / z["seeds"]) ** 0.5
            sure = min(r["seeds"], z["seeds"]) >= 2 and abs(d) > 2 * se
            texts.append(f"{d:+.1f} ± {se:.1f}{' *' if sure else ''}")
        label = m[0] if m[1] == "-" else f"{m[0]} ({m[1]})"
        out.append((f"{label} − {b}", texts))
    return out


def render(layout: DataLayout, budget: str) -> tuple[Path, Path, str]:
    """Write ``reports/leaderboard.html`` and ``reports/leaderboard.png`` for one ``budget`` (its JSON, as
    the ``budget`` column has it); returns their paths and the summary as a Markdown table (for the Prefect
    artifact)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, chance = _summary(layout, budget)
    out = layout.root / "reports"
    out.mkdir(parents=True, exist_ok=True)
    tasks = sorted({r["task"] for r in rows})
    methods = sorted({(r["method"], r["pairs_mode"]) for r in rows})
    cell = {(r["method"], r["pairs_mode"], r["task"]): r for r in rows}
    label = {m: m[0] if m[1] == "-" else f"{m[0]} ({m[1]})" for m in methods}

    md = ["| method | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    body = []
    for m in methods:
        cells_md, cells_html = [], []
        for t in tasks:
            r = cell.get((*m, t))
            if r is None:
                cells_md.append("—")
                cells_html.append("<td class=missing>—</td>")
                continue
            text = f"{r['mean']:.1f} ± {r['std']:.1f} (n={r['seeds']})"
            cells_md.append(text)
            cells_html.append(
                f"<td title='seeds {r['seed_list']}, min {r['min']}, max {r['max']}'>{text}</td>"
            )
        md.append(f"| {label[m]} | " + " | ".join(cells_md) + " |")
        body.append(f"<tr><th>{html.escape(label[m])}</th>{''.join(cells_html)}</tr>")
    md.append("| chance | " + " | ".join(f"{chance[t]:.1f}" if t in chance else "—" for t in tasks) + " |")
    metric = {t: next(r["metric"] for r in rows if r["task"] == t) for t in tasks}
    head = "".join(f"<th>{html.escape(t)}<br><small>{html.escape(metric[t])}</small></th>" for t in tasks)
    deltas = _delta_rows(rows, tasks)
    delta_html = "".join(
        f"<tr><th>{html.escape(name)}</th>{''.join(f'<td>{html.escape(x)}</td>' for x in texts)}</tr>"
        for name, texts in deltas
    )
    if deltas:
        md += ["", "| vs no pre-training | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
        md += [f"| {name} | " + " | ".join(texts) + " |" for name, texts in deltas]
    chance_row = "".join(f"<td>{chance[t]:.1f}</td>" if t in chance else "<td>—</td>" for t in tasks)
    page = out / "leaderboard.html"
    page.write_text(
        f"""<!doctype html><html><head><meta charset=utf-8><title>Leaderboard</title><style>
body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}} th{{background:#f4f4f4}}
td.missing{{color:#aaa}} tr.chance td{{color:#777;font-style:italic}}
</style></head><body><h1>Method × task leaderboard</h1>
<p>Headline metric per task, in %, mean ± sample std over seeds (n = seeds).
Budget: <code>{html.escape(budget)}</code>.
Every per-seed number and every other metric: <code>vlp sql "SELECT * FROM leaderboard"</code>.</p>
<table><tr><th>method</th>{head}</tr>{"".join(body)}<tr class=chance><th>chance</th>{chance_row}</tr></table>
<h2>Against no vision-language pre-training</h2>
<p>Each method's mean minus its baseline's (<code>none</code>; <code>none:regions</code> for the region
methods), ± the standard error of the difference; * where it exceeds twice that (n ≥ 2 on both sides).</p>
<table><tr><th>difference</th>{head}</tr>{delta_html}</table>
<p><img src="leaderboard.png" alt="leaderboard chart"></p></body></html>"""
    )
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(tasks)), 4.5), dpi=110)
    width = 0.8 / max(1, len(methods))
    # one colour per method: the default cycle repeats after 10 (the full leaderboard has 12 methods)
    palette = plt.get_cmap("tab20").colors
    for i, m in enumerate(methods):
        xs, ys, es = [], [], []
        for j, t in enumerate(tasks):
            r = cell.get((*m, t))
            if r is not None:
                xs.append(j + (i - (len(methods) - 1) / 2) * width)
                ys.append(r["mean"])
                es.append(r["std"])
        ax.bar(xs, ys, width, yerr=es, capsize=2, label=label[m], color=palette[i % len(palette)])
    for j, t in enumerate(tasks):
        if t in chance:
            ax.hlines(chance[t], j - 0.45, j + 0.45, colors="k", linestyles="dashed", linewidth=1)
    ax.set_xticks(range(len(tasks)), tasks, rotation=20)
    ax.set_ylabel("headline metric (%), mean ± std over seeds")
    ax.set_title("method × task (dashed: chance)")
    ax.legend(fontsize=8, ncols=2)
    fig.tight_layout()
    chart = out / "leaderboard.png"
    fig.savefig(chart)
    plt.close(fig)
    return page, chart, "\n".join(md)
