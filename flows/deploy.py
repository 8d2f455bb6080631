"""The scheduled deployment of `esmm-pipeline`: retrain every day on the latest window of
daily partitions, and promote only a better model.

One command starts it all (`make schedule` runs this)::

    python -m flows.deploy -c conf/default.yaml --start-server --cron "0 3 * * *"

``--start-server`` starts a local Prefect server (``prefect server start`` on 127.0.0.1:4200,
its database under PREFECT_HOME) and stops it on exit; without it, PREFECT_API_URL must name a
running server (the team set-up). A schedule needs a real server: Prefect's temporary
per-process server does not run the scheduler. The process then serves the deployment: the
server's scheduler creates a run at each cron tick and this process executes it. With the
simulator as the source each scheduled run first appends the next simulated day
(``--append-day``, on by default), so every run sees new data, as with a real daily feed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from flows.pipeline import esmm_pipeline

DEPLOYMENT_NAME = "daily"
SERVER_PORT = 4200
SERVER_START_TIMEOUT_SECONDS = 120
DEFAULT_CRON = "0 3 * * *"  # every day at 03:00 (server time zone: UTC unless told otherwise)


def build_deployment(
    config_path: str = "conf/default.yaml",
    cron: str = DEFAULT_CRON,
    window_days: int | None = 8,
    append_simulated_day: bool = True,
    overrides: list[str] | None = None,
):
    """The RunnerDeployment of the pipeline with its cron schedule and parameters."""
    window = [f"data.window_days={window_days}"] if window_days else []
    return esmm_pipeline.to_deployment(
        name=DEPLOYMENT_NAME,
        cron=cron,
        parameters={
            "config_path": str(config_path),
            "overrides": [*window, *(overrides or [])],
            "append_simulated_day": append_simulated_day,
        },
        description="Daily ESMM retraining on the latest window of daily partitions.",
        tags=["esmm", "scheduled"],
    )


@contextmanager
def local_prefect_server(port: int = SERVER_PORT):
    """Start `prefect server start` on loopback in its own process group; yield its API URL
    once healthy; stop the whole group on exit."""
    url = f"http://127.0.0.1:{port}/api"
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "prefect",
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_SECONDS
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the Prefect server is not healthy at {url}") from None
                time.sleep(1)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def main(
    config: Annotated[Path, typer.Option("--config", "-c")] = Path("conf/default.yaml"),
    cron: Annotated[str, typer.Option(help="Cron schedule.")] = DEFAULT_CRON,
    window_days: Annotated[int, typer.Option(help="Train on the latest N days (0: all days).")] = 8,
    append_day: Annotated[
        bool, typer.Option(help="Simulator source: append the next day before each run.")
    ] = True,
    start_server: Annotated[
        bool, typer.Option(help="Start (and stop) a local Prefect server for the schedule.")
    ] = False,
    overrides: Annotated[list[str] | None, typer.Option("--set", "-s")] = None,
) -> None:
    """Register the scheduled deployment and serve it until interrupted."""
    from prefect import serve
    from prefect.settings import PREFECT_API_URL, temporary_settings

    deployment = build_deployment(
        str(config), cron, window_days or None, append_day, list(overrides or [])
    )
    if not start_server:
        serve(deployment)
        return
    with local_prefect_server() as url, temporary_settings(updates={PREFECT_API_URL: url}):
        print(f"Prefect UI: {url.removesuffix('/api')}")
        serve(deployment)


if __name__ == "__main__":
    typer.run(main)
