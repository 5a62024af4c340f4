"""Shared fixtures. One real Prefect server per test session (temp home, free port on 127.0.0.1) and one
temp data directory; the bundled real data is linked in from the project's data directory (``make setup``
fetches it)."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from uuid import UUID

import pytest

# Resolve the real data before the session points VLP_DATA_DIR at a temp dir.
from vlp_core.paths import DataLayout

REAL = DataLayout.default()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_SESSION_DIR = Path(tempfile.mkdtemp(prefix="vlp-tests-"))
_PORT = _free_port()
# Before any Prefect import: every client in this session talks to the session's own server.
os.environ.update(
    VLP_DATA_DIR=str(_SESSION_DIR / "data"),
    PREFECT_HOME=str(_SESSION_DIR / "prefect"),
    PREFECT_API_URL=f"http://127.0.0.1:{_PORT}/api",
    PREFECT_SERVER_ANALYTICS_ENABLED="false",
    DO_NOT_TRACK="1",
    HF_HUB_OFFLINE="1",
    TRANSFORMERS_OFFLINE="1",
    PREFECT_LOGGING_TO_API_BATCH_INTERVAL="0.3",
)
(_SESSION_DIR / "data").mkdir(parents=True, exist_ok=True)


def pytest_sessionfinish(session, exitstatus) -> None:
    """Remove the session's data directory (corpora, runs: GBs), after the session fixtures (the Prefect
    stack) are torn down; ``VLP_KEEP_TEST_DATA=1`` keeps it for a post-mortem."""
    if os.environ.get("VLP_KEEP_TEST_DATA") != "1":
        shutil.rmtree(_SESSION_DIR, ignore_errors=True)


def link_fetched(root: Path) -> None:
    """Link the fetched raw data and model files (read-only inputs) into a test data directory."""
    for name in ("raw", "models"):
        if (REAL.root / name).exists() and not (root / name).exists():
            (root / name).symlink_to(REAL.root / name)


link_fetched(_SESSION_DIR / "data")


def submit_deployment(name: str, params: dict, threads: int | None = None) -> UUID:
    """Create a flow run of deployment ``name`` on the session's server, without waiting for it. Runs
    submitted together run at once on the worker: ``threads`` pins each one's torch threads
    (``OMP_NUM_THREADS`` through the process work pool's job variables), so that several at once do not
    oversubscribe the cores; ``None``: the flow's default (the cores over the training processes)."""
    from prefect.deployments import run_deployment

    job = {"env": {"OMP_NUM_THREADS": str(threads)}} if threads else None
    return run_deployment(name, parameters=params, timeout=0, job_variables=job).id


def await_flow_runs(ids: list[UUID], timeout: float = 900) -> dict[UUID, str]:
    """Wait until every flow run in ``ids`` is final -> {id: its state type, e.g. ``"COMPLETED"``}."""
    from prefect.client.orchestration import get_client

    async def wait() -> dict[UUID, str]:
        async with get_client() as client:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                runs = [await client.read_flow_run(i) for i in ids]
                if all(r.state is not None and r.state.is_final() for r in runs):
                    return {r.id: r.state.type.value for r in runs}
                await asyncio.sleep(1)
        raise TimeoutError(f"flow runs {ids} did not finish in {timeout}s")

    return asyncio.run(wait())


def failed_run_logs(states: dict[UUID, str], lines: int = 40) -> str:
    """The last ``lines`` log lines of every run in ``states`` (from :func:`await_flow_runs`) that did not
    complete (its subflows' too, read as ``vlp run`` reads them): what a failed assertion on submitted runs
    shows (the training child's output is logged)."""
    from flows.follow import follow_flow_run

    out = []
    for run_id, state in states.items():
        if state != "COMPLETED":
            logged: list[str] = []
            asyncio.run(follow_flow_run(run_id, logged.append, drain_s=0))
            out.append(f"flow run {run_id}: {state}\n" + "\n".join(logged[-lines:]))
    return "\n\n".join(out)


def needs_real_data(path: Path) -> None:
    if not path.exists():
        pytest.fail(f"{path} missing: run `make setup` (fetches the bundled data) before the tests")


@pytest.fixture(scope="session")
def real() -> DataLayout:
    """The project's data directory with the fetched raw data (Open Clip Art, WordNet, YOLO)."""
    needs_real_data(REAL.openclipart)
    return REAL


@pytest.fixture(scope="session")
def prefect_stack():
    """A real Prefect server + process worker + prefect.yaml deployments, for the whole session."""
    from flows.serve import start, stop

    home = _SESSION_DIR / "prefect"
    services = start(port=_PORT, home=home, worker=True, deploy=True, log=lambda m: None)
    yield services
    _flush_prefect_clients()
    stop(home, log=lambda m: None)


def _flush_prefect_clients() -> None:
    # Drain the in-process log/event workers while the server is still up, or they retry at exit.
    try:
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=5)
        EventsWorker.drain_all(timeout=5)
    except Exception:  # noqa: BLE001 - best effort at teardown
        pass


@pytest.fixture()
def data_dir(tmp_path, monkeypatch) -> DataLayout:
    """A fresh, empty data directory (with the real raw data linked in) for one test."""
    root = tmp_path / "data"
    root.mkdir()
    link_fetched(root)
    monkeypatch.setenv("VLP_DATA_DIR", str(root))
    return DataLayout(root)


@pytest.fixture(scope="session")
def train_corpus(prefect_stack, real) -> DataLayout:
    """A small real corpus for training tests: ~130 clip-art images of three categories with their
    captions, pooled with the news sentences, built through ingest → regions → embed → index → retrieve →
    phrases → links → gallery → ground (the region methods read the phrase links, VLMixer the gallery and the
    grounded words)."""
    import yaml

    from flows.build_corpus import build_corpus

    root = _SESSION_DIR / "train-data"
    root.mkdir(exist_ok=True)
    link_fetched(root)
    oca = root / "oca"
    for category in ("animals", "food", "transportation"):
        pngs = sorted((real.openclipart / "png" / category).rglob("*.png"))[:45]
        for p in pngs:
            rel = p.relative_to(real.openclipart / "png")
            for kind, path in (("png", p), ("svg", real.openclipart / "svg" / rel.with_suffix(".svg"))):
                if path.exists():
                    dest = oca / kind / rel.with_suffix(path.suffix)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    dest.symlink_to(path)
    cfg = {
        "sources": [
            {"name": "openclipart", "kind": "openclipart", "options": {"root": str(oca)}},
            {
                "name": "easyvqa",
                "kind": "easy_vqa",
                "options": {"limit_per_split": {"train": 40, "test": 20}},
            },
            {"name": "news", "kind": "gensim_news"},
        ],
        "stages": [
            "ingest",
            "regions",
            "embed",
            "index",
            "retrieve",
            "phrases",
            "links",
            "gallery",
            "ground",
        ],
        "ingest": {"image_shard_size": 50},
        "regions": {"shard_size": 50},
    }
    path = root / "corpus.yaml"
    path.write_text(yaml.safe_dump(cfg))
    previous = os.environ["VLP_DATA_DIR"]
    os.environ["VLP_DATA_DIR"] = str(root)
    try:
        build_corpus(config=str(path))
    finally:
        os.environ["VLP_DATA_DIR"] = previous
    return DataLayout(root)
