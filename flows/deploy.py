"""The scheduled deployment of `esmm-pipeline`: retrain every day on the latest window of
daily partitions, and promote only a better model.

One command starts it (a Prefect server must be reachable: `prefect server start`, or set
PREFECT_API_URL to your team's server)::

    python -m flows.deploy -c conf/default.yaml --cron "0 3 * * *" --window-days 8

The process serves the deployment: Prefect's scheduler creates a run at each cron tick and
this process executes it. With the simulator as the source each scheduled run first appends
the next simulated day (``--append-day``, on by default for the simulator), so every run sees
new data, as it would with a real daily feed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flows.pipeline import esmm_pipeline

DEPLOYMENT_NAME = "daily"
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


def main(
    config: Annotated[Path, typer.Option("--config", "-c")] = Path("conf/default.yaml"),
    cron: Annotated[str, typer.Option(help="Cron schedule.")] = DEFAULT_CRON,
    window_days: Annotated[int, typer.Option(help="Train on the latest N days (0: all days).")] = 8,
    append_day: Annotated[
        bool, typer.Option(help="Simulator source: append the next day before each run.")
    ] = True,
    overrides: Annotated[list[str] | None, typer.Option("--set", "-s")] = None,
) -> None:
    """Register the scheduled deployment and serve it until interrupted."""
    from prefect import serve

    deployment = build_deployment(
        str(config), cron, window_days or None, append_day, list(overrides or [])
    )
    serve(deployment)


if __name__ == "__main__":
    typer.run(main)
