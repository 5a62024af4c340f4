"""The ``vlp`` command line: fetch data, build the corpus, serve Prefect, inspect with SQL.

User errors (bad config, missing data, no server) print one clear line and exit 2; no tracebacks.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

import flows  # noqa: F401  (offline environment defaults)
from vlp_core.paths import DataLayout

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
# Rich cuts tables to 80 columns when stdout is not a terminal (a log, CI, a pipe), which leaves every cell
# of a wide table as "pret…"; off a terminal, lines are as wide as their content.
console = Console() if sys.stdout.isatty() else Console(width=1_000)
err = Console(stderr=True)


class UserError(Exception):
    pass


def _parse_sets(sets: list[str] | None) -> dict[str, Any]:
    out = {}
    for s in sets or []:
        if "=" not in s:
            raise UserError(f"--set expects key=value, got {s!r}")
        k, v = s.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)  # numbers, booleans, lists parse as YAML
    return out


def _choose_api() -> str:
    """Point this process at a Prefect API, the same way from any directory.

    ``PREFECT_API_URL`` in the environment is used as given (it must answer). Otherwise the stack that
    ``vlp serve`` started for this data directory, if it is up, then the address of the repository's
    ``prefect.toml`` (read only when run from the repository root), if something answers there; and when
    nothing does, a temporary server in this process (its database under ``<data>/prefect``).
    Returns a line that says which.
    """
    from prefect.settings import PREFECT_API_URL

    from flows.serve import healthy, read_state

    if os.environ.get("PREFECT_API_URL"):
        url = os.environ["PREFECT_API_URL"]
        if not healthy(url):
            raise UserError(f"no Prefect server answers at PREFECT_API_URL={url}: start one with `vlp serve`")
        return f"Prefect server {url} (PREFECT_API_URL)"
    state = read_state(Path(os.environ["PREFECT_HOME"]))
    for url, source in (
        (state.api_url if state else None, "vlp serve"),
        (PREFECT_API_URL.value(), "prefect.toml"),
    ):
        if url and healthy(url):
            os.environ["PREFECT_API_URL"] = url
            return f"Prefect server {url} ({source})"
    os.environ["PREFECT_API_URL"] = ""  # empty: Prefect starts a temporary server for this process
    return "no Prefect server is running (`vlp serve` starts one): this run uses a temporary one"


@app.command()
def fetch() -> None:
    """Fetch the bundled real data (Debian packages, YOLO weights) into the data directory (idempotent)."""
    from vlp_core.corpus.assets import fetch_all

    layout = fetch_all(log=lambda m: console.print(f"[cyan]{m}"))
    console.print(f"data directory: {layout.root}")


@app.command()
def ingest(
    config: Annotated[str, typer.Option(help="preset under configs/corpus/ or a YAML path")] = "default",
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="dotted override, e.g. ingest.max_pixels=1e8")
    ] = None,
) -> None:
    """Run the build-corpus flow in this process (against the running server, if any; the bundled data is
    fetched first where it is missing)."""
    from vlp_core.config import load_corpus_config
    from vlp_core.corpus.assets import AssetError, fetch_all

    overrides = _parse_sets(set_)
    load_corpus_config(config, overrides)  # a bad config is a one-line error, before any flow starts
    try:
        fetch_all(log=lambda m: console.print(f"[cyan]{m}"))  # a no-op once fetched
    except AssetError as exc:  # a config of the user's own data needs none of it
        err.print(f"[yellow]warning:[/yellow] the bundled data could not be fetched ({exc}); sources that "
                  "read it will say so")  # fmt: skip
    console.print(f"[cyan]{_choose_api()}")
    from flows.build_corpus import build_corpus

    result = build_corpus(config=config, overrides=overrides)
    _print_rows(result["summary"], "rows per source")
    _print_rows(result["rejects"], "rejects by stage and reason", empty="no rejects")


@app.command("build-tasks")
def build_tasks_cmd(
    task: Annotated[
        list[str] | None, typer.Option("--task", help="a bundled task (repeatable; default: all)")
    ] = None,
    scale: Annotated[float, typer.Option(help="multiply every split's default size")] = 1.0,
    seed: Annotated[int, typer.Option(help="the tasks' generation seed")] = 0,
    regions: Annotated[bool, typer.Option(help="also make their images' regions (region methods)")] = False,
) -> None:
    """Build the bundled scene tasks (NLVR2-, SNLI-VE-, RefCOCO+-, GQA- and Karpathy-shaped) into the store,
    resuming where a previous build stopped."""
    console.print(f"[cyan]{_choose_api()}")
    from flows.build_tasks import build_tasks

    result = build_tasks(tasks=task or None, scale=scale, seed=seed, regions=regions)
    _print_rows(result["summary"], "bundled tasks: examples, labels and chance per split")


@app.command("import-task")
def import_task_cmd(
    kind: Annotated[str, typer.Argument(help="nlvr2 | snli_ve | refcoco | gqa | karpathy")],
    file: Annotated[
        list[str], typer.Option("--file", help="an input file (repeatable; refcoco: refs, instances)")
    ],
    images: Annotated[str, typer.Option(help="the folder the examples' image paths are relative to")],
    name: Annotated[
        str | None, typer.Option(help="the task's name in the store (default: the dataset's)")
    ] = None,
    check_images: Annotated[bool, typer.Option(help="reject examples whose image file is missing")] = True,
    regions: Annotated[bool, typer.Option(help="also make its images' regions (region methods)")] = False,
) -> None:
    """Import a real downstream dataset from its files; bad records become rows of the rejects table."""
    from vlp_core.data.formats import READERS

    if kind not in READERS:  # one line, before any flow starts
        raise UserError(f"unknown dataset kind {kind!r}; the kinds are: {', '.join(READERS)}")
    for f in file:
        if not Path(f).expanduser().is_file():
            raise UserError(f"{kind}: input file {f} does not exist")
    console.print(f"[cyan]{_choose_api()}")
    from flows.build_tasks import import_task

    result = import_task(
        kind=kind, files=list(file), images=images, name=name, check_images=check_images, regions=regions
    )
    if result["skipped"]:
        console.print(f"{result['task']}: already imported from these files (nothing to do)")
    _print_rows(result["summary"], f"{result['task']}: examples per split")
    _print_rows(result["rejects"], "rejects by reason", empty="no rejects")


@app.command()
def serve(
    port: Annotated[int, typer.Option(help="server port on 127.0.0.1")] = 4200,
    worker: Annotated[bool, typer.Option(help="also start a process worker")] = True,
) -> None:
    """Start a local Prefect server + process work pool + worker, and register prefect.yaml's deployments."""
    from flows.serve import start

    s = start(port=port, worker=worker, log=lambda m: console.print(f"[cyan]{m}"))
    console.print(f"Prefect API {s.api_url}; UI http://127.0.0.1:{s.port}")
    if s.api_url != "http://127.0.0.1:4200/api":
        console.print(f"export PREFECT_API_URL={s.api_url}   # prefect.toml points at port 4200")
    console.print("run a deployment and follow it: vlp run build-corpus/default;  stop: vlp stop")


@app.command()
def run(
    deployment: Annotated[str, typer.Argument(help="flow/deployment, e.g. build-corpus/quickstart")],
    param: Annotated[
        list[str] | None,
        typer.Option("--param", "-p", help="a flow parameter key=value (YAML value; repeatable)"),
    ] = None,
    params: Annotated[str | None, typer.Option(help="the flow parameters as one JSON object")] = None,
) -> None:
    """Run a deployment on the local worker and follow it: its log lines as they come (stage shards with
    rate and ETA, training steps), then its final state; exits 1 unless it completed."""
    from flows.follow import run_and_follow
    from flows.serve import healthy, read_state

    values: dict[str, Any] = json.loads(params) if params else {}
    values.update(_parse_sets(param))
    url = os.environ.get("PREFECT_API_URL")
    if not url:
        state = read_state(Path(os.environ["PREFECT_HOME"]))
        url = state.api_url if state else None
    if not url or not healthy(url):
        raise UserError("no Prefect server with a worker is running: start one with `vlp serve`")
    os.environ["PREFECT_API_URL"] = url
    from prefect.exceptions import ObjectNotFound

    t0 = time.monotonic()
    try:
        _, final = run_and_follow(
            deployment, values, lambda line: console.print(line, markup=False, highlight=False)
        )
    except ObjectNotFound:
        raise UserError(f"no deployment {deployment!r} on {url} (prefect deployment ls lists them)") from None
    console.print(f"{deployment}: {final} in {time.monotonic() - t0:.0f}s")
    if final != "COMPLETED":
        raise typer.Exit(1)


@app.command()
def stop() -> None:
    """Stop the worker and server started by `vlp serve`."""
    from flows.serve import stop as stop_stack

    stop_stack(log=lambda m: console.print(m))


@app.command()
def status() -> None:
    """Show the local Prefect stack and where data lives."""
    from flows.serve import _alive, healthy, read_state

    layout = DataLayout.default()
    s = read_state(layout.prefect_home)
    console.print(f"data directory: {layout.root}")
    if s is None:
        console.print("Prefect stack: not started (vlp serve)")
        return
    console.print(f"server {s.api_url}: {'healthy' if healthy(s.api_url) else 'DOWN'} (pid {s.server_pid})")
    console.print(f"worker on {s.pool}: {'running' if _alive(s.worker_pid) else 'not running'}")


@app.command()
def report(
    out: Annotated[Path | None, typer.Option(help="HTML file (default <data>/reports/corpus.html)")] = None,
    examples: Annotated[int, typer.Option(help="images in the retrieval gallery")] = 30,
) -> None:
    """Corpus quality vs random pairs (alignment@1/@K, category@K, tag coverage, link rate) + HTML gallery."""
    from flows.report import quality_metrics, write_html
    from stores.catalog import build_catalog

    layout = DataLayout.default()
    build_catalog(layout.catalog, layout.store)
    metrics = quality_metrics(layout)
    q = metrics["quality"]
    if not q["images_evaluated"]:
        raise UserError("no retrieved pairs with known captions yet: run the retrieve stage first")
    _print_rows(
        [
            {"metric": m, "retrieved": q[m], "random pairs": q[f"random_{m}"]}
            for m in ("alignment_at_1", "alignment_at_k", "category_at_k", "category_precision_at_k")
        ],
        f"K = {q['k']}",
    )
    _print_rows(metrics["tag_coverage"], "tag coverage")
    console.print(f"link rate {q['link_rate']:.3f}; rejects {q['rejects']}")
    page = write_html(layout, out or layout.root / "reports" / "corpus.html", metrics, n_examples=examples)
    console.print(f"wrote {page}")


@app.command()
def catalog() -> None:
    """(Re)build the DuckDB catalog's views from sql/*.sql."""
    from stores.catalog import build_catalog

    layout = DataLayout.default()
    views = build_catalog(layout.catalog, layout.store)
    console.print(f"{layout.catalog}: {len(views)} views: {', '.join(views)}")


@app.command()
def sql(
    query: Annotated[str, typer.Argument(help="SQL to run on the catalog (read-only)")],
    fmt: Annotated[str, typer.Option("--format", help="table | csv | json")] = "table",
    limit: Annotated[int, typer.Option(help="max rows shown in table format")] = 50,
    title: Annotated[str | None, typer.Option(help="title over the table")] = None,
    empty: Annotated[str, typer.Option(help="what to print when the query returns no rows")] = "no rows",
) -> None:
    """Query the catalog read-only, e.g. vlp sql "select * from rejects_by_reason"."""
    import duckdb

    from stores.catalog import connect

    layout = DataLayout.default()
    from stores.catalog import build_catalog, sql_files

    newest_view = max(f.stat().st_mtime for f in sql_files())
    if not layout.catalog.exists() or layout.catalog.stat().st_mtime < newest_view:
        build_catalog(layout.catalog, layout.store)  # views older than sql/ (e.g. after an update): rebuilt
    con = connect(layout.catalog)
    try:
        rel = con.execute(query)
        cols = [d[0] for d in rel.description] if rel.description else []
        rows = rel.fetchall()
    except duckdb.Error as exc:
        raise UserError(f"SQL error: {exc}") from None
    finally:
        con.close()
    if fmt == "json":
        print(json.dumps([dict(zip(cols, r, strict=True)) for r in rows], default=str, indent=1))
    elif fmt == "csv":
        import csv

        w = csv.writer(sys.stdout)
        w.writerow(cols)
        w.writerows(rows)
    else:
        _print_rows([dict(zip(cols, r, strict=True)) for r in rows[:limit]], title, empty=empty)
        if len(rows) > limit:
            console.print(f"... {len(rows) - limit} more rows (--limit)")


@app.command()
def runs(
    metrics: Annotated[
        str, typer.Option(help="comma-separated eval metrics to show")
    ] = "itc_i2t_r1,itc_t2i_r1,itc_mean_r,itm_mean_r,vqa_accuracy,accuracy",
) -> None:
    """Training runs under <data>/runs/train: task, steps, last loss and evaluation."""
    from vlp_core.train.metrics import read_metrics

    root = DataLayout.default().runs / "train"
    rows = []
    for run in sorted(p for p in root.glob("*") if (p / "config.yaml").exists()):
        cfg = yaml.safe_load((run / "config.yaml").read_text()) or {}
        info = json.loads((run / "run.json").read_text()) if (run / "run.json").exists() else {}
        ev = json.loads((run / "eval.json").read_text()) if (run / "eval.json").exists() else {}
        last = (read_metrics(run / "metrics.jsonl") or [{}])[-1]
        task_cfg = cfg.get("task") if isinstance(cfg.get("task"), dict) else {"kind": cfg.get("task")}
        task = task_cfg.get("kind")
        row = {
            "run": run.name,
            "task": task,
            "method": cfg.get("method"),
            # a task's dataset (easy-VQA, a bundled or imported task), else the pre-training pairs
            "data": task_cfg.get("dataset") or (cfg.get("data") or {}).get("pairs", {}).get("mode", ""),
            "steps": info.get("step", last.get("step")),
            "loss": last.get("loss"),
        }
        row.update({m: ev.get(m) for m in metrics.split(",") if m})
        rows.append(row)
    _print_rows(rows, f"training runs in {root}")


def _print_rows(rows: list[dict], title: str | None, empty: str = "no rows") -> None:
    if not rows:
        console.print(f"{title or 'result'}: {empty}")
        return
    t = Table(title=title)
    for c in rows[0]:
        t.add_column(str(c))
    for r in rows:
        t.add_row(*[_fmt(v) for v in r.values()])
    console.print(t)


def _fmt(v: Any) -> str:
    if isinstance(v, bytes | bytearray):
        return f"<{len(v)} bytes>"
    if isinstance(v, float):
        return f"{v:.4g}"
    s = str(v)
    return s if len(s) <= 80 else s[:77] + "..."


def main() -> None:
    os.environ.setdefault("PREFECT_HOME", str(DataLayout.default().prefect_home))
    # Prefect opens its SQLite database under its home and does not create the folder itself.
    Path(os.environ["PREFECT_HOME"]).expanduser().mkdir(parents=True, exist_ok=True)
    try:
        app()
    except (UserError, FileNotFoundError, ValueError, ValidationError) as exc:
        err.print(f"[red]error:[/red] {exc}")
        sys.exit(2)
    except Exception as exc:  # a known failure of the local stack reads as one line too
        from flows.serve import ServeError

        if isinstance(exc, ServeError):
            err.print(f"[red]error:[/red] {exc}")
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
