"""Run a deployment and follow it: its log lines (and its subflows'), as they come, then its final state.
What ``vlp run`` does, so a terminal shows a worker's progress (stage shards with rate and ETA, training
steps) instead of state changes only."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any
from uuid import UUID

__all__ = ["follow_flow_run", "run_and_follow"]

#: how far before the newest line seen each poll looks again (workers send logs in batches, so a line can
#: arrive after a newer one); lines already printed are skipped by id.
LOOKBACK_S = 60


async def _family(client: Any, root: UUID) -> set[UUID]:
    """``root`` and every flow run below it (subflows, their subflows, ...)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    ids, frontier = {root}, [root]
    while frontier:
        children = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=frontier))
        )
        frontier = [r.id for r in children if r.id not in ids]
        ids.update(frontier)
    return ids


def _drain_seconds() -> float:
    """How long to keep reading logs after the run is final: the flow process sends its last batch of log
    lines when it exits, which can be after its final state reached the server (one batch interval, plus a
    second for the exit)."""
    from prefect.settings import PREFECT_LOGGING_TO_API_BATCH_INTERVAL

    return float(PREFECT_LOGGING_TO_API_BATCH_INTERVAL.value()) + 1.0


async def follow_flow_run(
    flow_run_id: UUID,
    emit: Callable[[str], None],
    poll_s: float = 1.0,
    timeout_s: float | None = None,
    drain_s: float | None = None,
) -> str:
    """Print (``emit``) every log line of the flow run and its subflows in time order until it is final, and
    for ``drain_s`` more (default: the log batch interval + 1 s; the last lines can reach the server after
    the final state); returns its final state type (``COMPLETED``, ``FAILED``, ``CRASHED``, ``CANCELLED``)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId, LogFilterTimestamp
    from prefect.client.schemas.sorting import LogSort

    seen: set[UUID] = set()
    since = None
    t0 = time.monotonic()
    drain_s = _drain_seconds() if drain_s is None else drain_s
    final_at: float | None = None
    async with get_client() as client:
        while True:
            run = await client.read_flow_run(flow_run_id)
            if final_at is None and run.state is not None and run.state.is_final():
                final_at = time.monotonic()
            ids = await _family(client, flow_run_id)
            flt = LogFilter(flow_run_id=LogFilterFlowRunId(any_=list(ids)))
            if since is not None:  # logs reach the server in batches: look back a while, skip those seen
                flt.timestamp = LogFilterTimestamp(after_=since - timedelta(seconds=LOOKBACK_S))
            offset = 0
            while True:
                logs = await client.read_logs(
                    log_filter=flt, sort=LogSort.TIMESTAMP_ASC, limit=200, offset=offset
                )
                for log in logs:
                    if log.id in seen:
                        continue
                    seen.add(log.id)
                    emit(f"{log.timestamp:%H:%M:%S} {log.message}")
                    since = log.timestamp
                if len(logs) < 200:
                    break
                offset += len(logs)
            if final_at is not None and time.monotonic() - final_at >= drain_s:
                return run.state.type.value
            if timeout_s is not None and time.monotonic() - t0 > timeout_s:
                raise TimeoutError(f"flow run {flow_run_id} not finished after {timeout_s:.0f}s")
            await asyncio.sleep(poll_s)


def run_and_follow(
    name: str, parameters: dict[str, Any], emit: Callable[[str], None], timeout_s: float | None = None
) -> tuple[UUID, str]:
    """Submit deployment ``name`` (``flow/deployment``) with ``parameters`` and follow it to its end."""
    from prefect.deployments import run_deployment

    run = run_deployment(name, parameters=parameters, timeout=0)
    emit(f"flow run {run.name} ({run.id}) of {name} submitted")
    return run.id, asyncio.run(follow_flow_run(run.id, emit, timeout_s=timeout_s))
