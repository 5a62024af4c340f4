"""flows: Prefect orchestration of vlp_core (flows, deployments, the local server + worker, the CLI)."""

import os

# Offline by default: no client analytics, no server telemetry (set before Prefect is imported).
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
