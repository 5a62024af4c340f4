"""flows: Prefect orchestration of vlp_core (flows, deployments, the local server + worker, the CLI)."""

import os

# Offline by default: no client analytics, no server telemetry (set before Prefect is imported).
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# prefect.toml's settings, for runs from outside the repository root (where Prefect does not read it): a cold
# temporary server on a busy 2-core machine can take longer than Prefect's 20 s default to start.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
