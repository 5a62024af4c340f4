"""Start and stop the local Prefect stack: server (127.0.0.1), a process work pool, a worker, deployments.

The deployments are declared once, in ``prefect.yaml`` at the repository root (the production shape: a GPU
node runs ``prefect worker start --pool vlp-local`` against the same file), and registered here with
``prefect deploy --all``. Processes run in their own sessions with logs under ``<data>/prefect/logs``; their
PIDs and address are kept in ``<data>/prefect/services.json`` so ``vlp stop`` can end them.

SQLite is the default database; set ``PREFECT_SERVER_DATABASE_CONNECTION_URL=postgresql+asyncpg://…`` to use
PostgreSQL (recommended when several workers write at once).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from vlp_core.paths import REPO_ROOT, DataLayout

POOL = "vlp-local"


class ServeError(RuntimeError):
    pass


@dataclass
class Services:
    api_url: str
    port: int
    home: str
    server_pid: int
    worker_pid: int | None = None
    pool: str = POOL


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stack_env(home: Path, api_url: str) -> dict[str, str]:
    """Environment for every process of the stack: isolated home, loopback API, telemetry off."""
    env = dict(os.environ)
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_API_URL=api_url,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        PREFECT_SERVER_API_HOST="127.0.0.1",
        PREFECT_WORKER_QUERY_SECONDS=env.get("PREFECT_WORKER_QUERY_SECONDS", "2"),
        PREFECT_RUNNER_POLL_FREQUENCY=env.get("PREFECT_RUNNER_POLL_FREQUENCY", "2"),
        VLP_REPO_DIR=str(REPO_ROOT),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
    )
    env.setdefault("VLP_DATA_DIR", str(DataLayout.default().root))
    return env


def healthy(api_url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


def _prefect(*args: str, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "prefect", *args]
    proc = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise ServeError(f"`prefect {' '.join(args)}` failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return proc


def _spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "prefect", *args],
            env=env,
            cwd=REPO_ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # own process group: stopped as a unit, survives the CLI exiting
        )


def state_file(home: Path) -> Path:
    return home / "services.json"


def read_state(home: Path) -> Services | None:
    p = state_file(home)
    return Services(**json.loads(p.read_text())) if p.exists() else None


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child (exited, not yet reaped) is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return True


def start(
    port: int = 4200,
    home: Path | None = None,
    worker: bool = True,
    deploy: bool = True,
    timeout: float = 120.0,
    log=print,
) -> Services:
    """Start server (+ pool, deployments, worker) unless already running; idempotent."""
    home = Path(home or DataLayout.default().prefect_home)
    home.mkdir(parents=True, exist_ok=True)
    state = read_state(home)
    if state and _alive(state.server_pid) and healthy(state.api_url):
        log(f"Prefect server already running at {state.api_url} (pid {state.server_pid})")
        if deploy:  # prefect.yaml may have gained or changed deployments since the server started
            out = _prefect("--no-prompt", "deploy", "--all", env=stack_env(home, state.api_url))
            n = out.stdout.count("Deployment '")
            log(f"registered deployments from prefect.yaml ({n} deployments)")
        if worker and not _alive(state.worker_pid):
            state.worker_pid = _start_worker(state, stack_env(home, state.api_url), home).pid
            state_file(home).write_text(json.dumps(asdict(state), indent=1))
        return state
    api_url = f"http://127.0.0.1:{port}/api"
    if healthy(api_url):
        raise ServeError(f"something else already answers on {api_url}; pick another --port")
    env = stack_env(home, api_url)
    log(f"starting Prefect server on 127.0.0.1:{port} (home {home})")
    server = _spawn(
        ["server", "start", "--host", "127.0.0.1", "--port", str(port)], env, home / "logs" / "server.log"
    )
    state = Services(api_url=api_url, port=port, home=str(home), server_pid=server.pid)
    state_file(home).write_text(json.dumps(asdict(state), indent=1))
    t0 = time.time()
    while not healthy(api_url):
        if server.poll() is not None:
            raise ServeError(f"server exited ({server.returncode}); see {home / 'logs' / 'server.log'}")
        if time.time() - t0 > timeout:
            stop(home)
            raise ServeError(f"server not healthy after {timeout:.0f}s; see {home / 'logs' / 'server.log'}")
        time.sleep(0.5)
    log(f"server healthy after {time.time() - t0:.1f}s; UI at http://127.0.0.1:{port}")
    _prefect("work-pool", "create", POOL, "--type", "process", "--overwrite", env=env)
    if deploy:
        out = _prefect("--no-prompt", "deploy", "--all", env=env)
        n = out.stdout.count("Deployment '")
        log(f"registered deployments from prefect.yaml ({n} deployments)")
    if worker:
        state.worker_pid = _start_worker(state, env, home).pid
        log(f"worker started on pool {POOL!r} (pid {state.worker_pid})")
    state_file(home).write_text(json.dumps(asdict(state), indent=1))
    return state


def _start_worker(state: Services, env: dict[str, str], home: Path) -> subprocess.Popen:
    return _spawn(
        ["worker", "start", "--pool", state.pool, "--type", "process"], env, home / "logs" / "worker.log"
    )


def stop(home: Path | None = None, timeout: float = 20.0, log=print) -> bool:
    """Stop the worker, then the server (SIGTERM to each process group, SIGKILL after ``timeout``)."""
    home = Path(home or DataLayout.default().prefect_home)
    state = read_state(home)
    if state is None:
        log("no Prefect stack recorded; nothing to stop")
        return False
    for name, pid in (("worker", state.worker_pid), ("server", state.server_pid)):
        if not _alive(pid):
            continue
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        t0 = time.time()
        while _alive(pid) and time.time() - t0 < timeout:
            time.sleep(0.2)
        if _alive(pid):
            os.killpg(pid, signal.SIGKILL)
        log(f"stopped {name} (pid {pid})")
    state_file(home).unlink(missing_ok=True)
    return True
