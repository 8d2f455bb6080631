"""Prefect flows around the esmm library: the pipeline and its scheduled deployment.

Importing this package sets quiet, local defaults before Prefect is imported (each only when
the variable is unset): Prefect's home under ./runs/prefect, a patient start-up timeout for its
temporary local server (the 20 s default flakes on a cold start), and no analytics.
"""

import os
from pathlib import Path

os.environ.setdefault("PREFECT_HOME", str(Path("runs/prefect").resolve()))
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
# Prefect creates its home folder but not the folders above it (runs/ on a fresh clone).
Path(os.environ["PREFECT_HOME"]).expanduser().mkdir(parents=True, exist_ok=True)
