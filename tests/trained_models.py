"""A small ESMM trained on simulated data, and logged to MLflow: what the serving, precision,
REST and promotion tests score, load and register."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from esmm.config import Config, load_config
from esmm.data.sources import simulate_to_file
from esmm.prepare import load_prepared, prepare
from esmm.train import train_stage

SMALL_MODEL = (
    "data.simulator.rows=8000",
    "data.simulator.days=4",
    "model.embedding_dim=4",
    "model.tower_dims=[16]",
    "train.epochs=1",
)


def train_small_model(folder: Path, *overrides: str) -> tuple[Config, pa.Table]:
    """Simulate, prepare and train under ``folder`` (outputs in ``out/``, MLflow store
    ``mlflow.db``); ``overrides`` come last, so they win. Returns the config and the
    prepared test table."""
    config = load_config(
        None,
        [
            f"output_dir={folder / 'out'}",
            *SMALL_MODEL,
            f"tracking.tracking_uri=sqlite:///{folder}/mlflow.db",
            *overrides,
        ],
    )
    simulate_to_file(config)
    prepare(config)
    train_stage(config, progress=False)
    return config, load_prepared(config).tables["test"]


def log_trained_model(config: Config, test: pa.Table) -> tuple[str, str]:
    """Log ``<output_dir>/model`` as a pyfunc model in a new, finished MLflow run; returns the
    model URI and the run id."""
    from esmm.tracking import Tracker

    tracker = Tracker.start(config)
    model_uri = tracker.log_model(config.output_path / "model", test.slice(0, 20))
    tracker.finish()
    return model_uri, tracker.run_id
