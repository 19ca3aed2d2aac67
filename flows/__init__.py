"""Prefect flows of the AdaRound pipeline; ``python -m flows --help`` lists the stages."""

import os

# Defaults for a Prefect with no server started by hand (ephemeral mode); the
# environment still wins. Telemetry cannot reach the internet here, and a fresh
# PREFECT_HOME takes up to ~20 s to start the temporary server.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
