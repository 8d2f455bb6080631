"""MLflow tracking: one parent run per pipeline run, one nested run per tuning trial.

Everything goes through an explicit ``MlflowClient`` and run ids, never MLflow's per-thread
"active run", so stages may run in any thread (Prefect runs tasks in worker threads). Only
logging the pyfunc model needs an active run; :meth:`Tracker.log_model` opens it briefly.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunStatus
from mlflow.tracking import MlflowClient

from esmm.config import Config, TrackingSettings, dump_config
from esmm.train import EpochResult

log = logging.getLogger(__name__)

DEFAULT_STORE = Path("runs/mlflow")
PARENT_RUN_TAG = "mlflow.parentRunId"
MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value
_URL_PASSWORD = re.compile(r"(://[^:/@\s]+:)[^@\s]+@")


def tracking_uri(settings: TrackingSettings) -> str:
    """The configured URI, or a SQLite file under runs/mlflow (absolute, so every thread and
    process started from here uses the same store)."""
    if settings.tracking_uri:
        return settings.tracking_uri
    return f"sqlite:///{(DEFAULT_STORE / 'mlflow.db').resolve()}"


def local_store_folder(uri: str) -> Path | None:
    """The folder of a local SQLite store (for artifacts and locks); None for servers."""
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///")).parent
    return None


def connect(settings: TrackingSettings) -> tuple[MlflowClient, str]:
    """Point MLflow at the configured store and return a client and the experiment id
    (created on first use, with artifacts beside a local store)."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no bar per download
    uri = tracking_uri(settings)
    folder = local_store_folder(uri)
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = MlflowClient(uri, uri)
    experiment = client.get_experiment_by_name(settings.experiment)
    if experiment is not None:
        return client, experiment.experiment_id
    artifacts = settings.artifact_location
    if artifacts is None and folder is not None:
        artifacts = str((folder / "artifacts").resolve())
    elif artifacts is not None and "://" not in artifacts:
        artifacts = str(Path(artifacts).resolve())
    return client, client.create_experiment(settings.experiment, artifact_location=artifacts)


def redact(value: str) -> str:
    """Hide passwords in URLs (``postgresql://user:secret@host`` -> ``user:***@host``)."""
    return _URL_PASSWORD.sub(r"\1***@", value)


def flatten_config(config: Config) -> dict[str, str]:
    """Every config value as a dotted param (``train.batch_size``), passwords redacted."""
    flat: dict[str, str] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, Mapping):
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else str(key), value)
        else:
            flat[prefix] = redact(str(node))[:MAX_PARAM_LENGTH]

    walk("", config.model_dump(mode="json"))
    return flat


def code_version() -> str:
    """The package version and, in a git checkout, the commit (``+dirty`` if modified)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        package = version("esmm")
    except PackageNotFoundError:
        package = "unknown"
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        command = ["git", "-C", str(root), *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=5, check=True).stdout

    try:
        commit = git("rev-parse", "--short", "HEAD").strip()
        dirty = git("status", "--porcelain", "--untracked-files=no").strip()
    except (OSError, subprocess.SubprocessError):
        return package
    return f"{package}+{commit}{'.dirty' if dirty else ''}"


def _metrics(values: Mapping[str, float], step: int, prefix: str = "") -> list[Metric]:
    now = int(time.time() * 1000)
    return [
        Metric(f"{prefix}{key}", float(value), now, step)
        for key, value in values.items()
        if isinstance(value, int | float)
    ]


class Tracker:
    """Logs one pipeline run (the parent) and its trials (nested runs) to MLflow."""

    def __init__(self, client: MlflowClient, experiment_id: str, run_id: str, uri: str) -> None:
        self.client = client
        self.uri = uri
        self.experiment_id = experiment_id
        self.run_id = run_id

    @classmethod
    def start(cls, config: Config, run_name: str | None = None) -> Tracker:
        client, experiment_id = connect(config.tracking)
        run = client.create_run(
            experiment_id,
            run_name=run_name or f"{config.name}-{time.strftime('%Y%m%d-%H%M%S')}",
            tags={
                "esmm.config_name": config.name,
                "esmm.model_kind": config.model.kind,
                "esmm.code_version": code_version(),
                "esmm.stage": "pipeline",
            },
        )
        tracker = cls(client, experiment_id, run.info.run_id, tracking_uri(config.tracking))
        tracker.log_config(config)
        return tracker

    def log_config(self, config: Config, run_id: str | None = None) -> None:
        """All config values as params, plus the resolved YAML as an artifact."""
        run_id = run_id or self.run_id
        params = [Param(key, value) for key, value in flatten_config(config).items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(run_id, params=params[start : start + 100])
        self.client.log_text(run_id, redact(dump_config(config)), "config/resolved.yaml")

    def log_params(self, values: Mapping[str, Any], run_id: str | None = None) -> None:
        params = [Param(key, redact(str(value))) for key, value in values.items()]
        self.client.log_batch(run_id or self.run_id, params=params)

    def set_tags(self, tags: Mapping[str, Any], run_id: str | None = None) -> None:
        for key, value in tags.items():
            self.client.set_tag(run_id or self.run_id, key, str(value))

    def log_metrics(
        self,
        values: Mapping[str, float],
        step: int = 0,
        prefix: str = "",
        run_id: str | None = None,
    ) -> None:
        metrics = _metrics(values, step, prefix)
        for start in range(0, len(metrics), 1000):
            self.client.log_batch(run_id or self.run_id, metrics=metrics[start : start + 1000])

    def epoch_logger(self, run_id: str | None = None) -> Callable[[EpochResult], None]:
        """A per-epoch callback: train loss, samples/s and validation metrics at step=epoch."""

        def log_epoch(epoch: EpochResult) -> None:
            values = {"train_loss": epoch.train_loss, "samples_per_s": epoch.samples_per_second}
            values |= {f"val_{name}": value for name, value in epoch.val_metrics.items()}
            self.log_metrics(values, step=epoch.epoch, run_id=run_id)

        return log_epoch

    def log_dataset(self, manifest: Mapping, source: str | Path, name: str) -> None:
        """The prepared data as a run input: its source (a file or folder), the content digest
        of the prepared splits, and their sizes."""
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag

        with warnings.catch_warnings():  # MLflow registers two equal sources for local paths
            warnings.filterwarnings("ignore", message="The specified dataset source can be")
            dataset_source = resolve_dataset_source(str(Path(source).resolve()))
        dataset = MetaDataset(dataset_source, name=name, digest=manifest["fingerprint"])
        tags = [InputTag("mlflow.data.context", "training")]
        self.client.log_inputs(self.run_id, [DatasetInput(dataset._to_mlflow_entity(), tags)])
        self.set_tags({"esmm.data_fingerprint": manifest["fingerprint"]})
        for split, summary in manifest["splits"].items():
            self.log_metrics(summary, prefix=f"data_{split}_")

    def log_artifacts(self, folder: str | Path, artifact_path: str) -> None:
        self.client.log_artifacts(self.run_id, str(folder), artifact_path)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_model(self, model_dir: str | Path, example_table) -> str:
        """Log the trained folder as the run's pyfunc model; returns its model URI."""
        from esmm.serving import log_pyfunc_model

        # log_model needs the active run of this thread: open ours, leave it open for us
        # (the parent's status is set by finish(), not by leaving this block).
        previous = mlflow.active_run()
        if previous is not None and previous.info.run_id != self.run_id:
            raise RuntimeError(f"another MLflow run ({previous.info.run_id}) is active here")
        with contextlib.ExitStack() as stack:
            if previous is None:
                stack.enter_context(mlflow.start_run(run_id=self.run_id))
            info = log_pyfunc_model(model_dir, example_table)
        self.client.update_run(self.run_id, status="RUNNING")
        return info.model_uri

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)

    @contextlib.contextmanager
    def nested_run(self, run_name: str, tags: Mapping[str, str] | None = None) -> Iterator[str]:
        """A child run of the pipeline run; FAILED if the block raises, KILLED if a trial is
        pruned, FINISHED otherwise."""
        run = self.client.create_run(
            self.experiment_id,
            run_name=run_name,
            tags={PARENT_RUN_TAG: self.run_id, **(tags or {})},
        )
        run_id = run.info.run_id
        try:
            yield run_id
        except BaseException as error:
            pruned = type(error).__name__ == "TrialPruned"
            self.client.set_terminated(run_id, "KILLED" if pruned else "FAILED")
            if not pruned:
                self.set_tags({"esmm.error": f"{type(error).__name__}: {error}"[:5000]}, run_id)
            raise
        self.client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))


class TrialTracker:
    """The tuning stage's observer (esmm.tune.TrialObserver): one nested MLflow run per trial
    with the trial's full config as params and its epochs as stepped metrics."""

    def __init__(self, tracker: Tracker, config_for_params: Callable[[dict], Config]) -> None:
        self.tracker = tracker
        self.config_for_params = config_for_params

    @contextlib.contextmanager
    def trial(self, number: int, params: dict[str, Any]) -> Iterator[Callable[[EpochResult], None]]:
        config = self.config_for_params(params)
        tags = {"esmm.stage": "trial", "esmm.trial_number": str(number)}
        with self.tracker.nested_run(f"trial-{number:03d}", tags) as run_id:
            self.tracker.log_config(config, run_id)
            self.tracker.log_params(
                {f"search.{key}": value for key, value in params.items()}, run_id
            )
            yield self.tracker.epoch_logger(run_id)


def local_ui_command(uri: str) -> str:
    """The one command that opens the MLflow UI on this store (with this environment's
    mlflow, so it works without activating the virtual environment)."""
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    with contextlib.suppress(ValueError):
        mlflow_bin = mlflow_bin.relative_to(Path.cwd())
    return f"{mlflow_bin} ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"
