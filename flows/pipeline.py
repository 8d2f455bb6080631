"""The `esmm-pipeline` Prefect flow: load -> validate -> prepare -> tune -> train -> evaluate ->
register -> promote, one task per stage, each calling the esmm library.

Run it once (the README's main command)::

    python -m flows.pipeline -c conf/default.yaml [--set key=value ...]

It logs one MLflow parent run (config, data, validation report, tuning plots, the final
model's curves, test metrics and the pyfunc model) with one nested run per tuning trial, and
ends by printing the parent run id, the test metrics, the promotion decision and the command
that opens the MLflow UI. A failure at any stage marks the parent run FAILED; nothing is
registered or promoted unless every stage before ``register`` succeeded.
"""

from __future__ import annotations

import hashlib
import json
import logging
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from esmm.config import Config, load_config

log = logging.getLogger("esmm.pipeline")

STORAGE_RETRIES = 2  # stages that touch files, databases or the tracking server
SERVER_RETRIES = 3
RETRY_DELAY_SECONDS = 5


@task(name="load", retries=STORAGE_RETRIES, retry_delay_seconds=RETRY_DELAY_SECONDS)
def load_data(config: Config, append_simulated_day: bool = False) -> dict[str, Any]:
    """Make sure the source exists (simulating or appending a day for the simulator) and
    fingerprint it; the fingerprint keys the prepared-data cache."""
    from esmm.data import sources

    if config.data.source == "simulator":
        if not sources.simulated_table_path(config).exists():
            sources.simulate_to_file(config)
        elif append_simulated_day:
            path, day, rows = sources.append_simulated_day(config)
            log.info("appended day %d (%d impressions) to %s", day, rows, path)
    files = [str(path) for path in sources.source_files(config)]
    return {"fingerprint": sources.source_fingerprint(config), "files": files}


@task(
    name="validate",
    retries=SERVER_RETRIES,
    retry_delay_seconds=RETRY_DELAY_SECONDS,
    retry_condition_fn=lambda task, run, state: not _is_validation_failure(state),
    cache_policy=NO_CACHE,
)
def validate_data(config: Config, tracker) -> dict[str, Any]:
    """Great Expectations suite. The report folder is written and logged to MLflow whether
    the suite passes or not, so a failed run shows which expectations failed."""
    from esmm.validate import REPORT_FOLDER, validate_stage

    try:
        report = validate_stage(config)
    except Exception:
        tracker.set_tags({"esmm.failed_stage": "validate"})
        raise
    finally:
        folder = config.output_path / REPORT_FOLDER
        if folder.exists():
            tracker.log_artifacts(folder, "validation")
    return {"success": report.success, "expectations": len(report.results)}


def _is_validation_failure(state) -> bool:
    """Bad data fails the same way every time: only retry validation when a server failed."""
    from esmm.validate import DataValidationFailed

    try:
        state.result()
    except DataValidationFailed:
        return True
    except Exception:
        return False
    return False


def _prepare_cache_key(context, parameters: dict[str, Any]) -> str:
    """Prepared data is reused for the same input files and split/encode settings."""
    from esmm.prepare import prepared_path

    config: Config = parameters["config"]
    identity = {
        "input": parameters["input_fingerprint"],
        "split": config.split.model_dump(mode="json"),
        "encode": config.encode.model_dump(mode="json"),
        "folder": str(prepared_path(config).resolve()),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _prepared_folder_matches(config: Config, input_fingerprint: str) -> bool:
    """Whether the prepared folder on disk was made from this input (a cache hit is only
    trusted then: the folder may have been deleted or overwritten since)."""
    from esmm.prepare import MANIFEST_FILE, prepared_path

    manifest = prepared_path(config) / MANIFEST_FILE
    if not manifest.exists():
        return False
    return json.loads(manifest.read_text()).get("input_fingerprint") == input_fingerprint


@task(
    name="prepare",
    retries=STORAGE_RETRIES,
    retry_delay_seconds=RETRY_DELAY_SECONDS,
    cache_key_fn=_prepare_cache_key,
    cache_expiration=timedelta(days=7),
    persist_result=True,
)
def prepare_data(config: Config, input_fingerprint: str) -> dict[str, Any]:
    """Split by time and fit the encoders on train (skipped when the cache key matches)."""
    from esmm.prepare import prepare

    return prepare(config, input_fingerprint=input_fingerprint).manifest


@task(name="tune", retries=1, retry_delay_seconds=RETRY_DELAY_SECONDS, cache_policy=NO_CACHE)
def tune_model(config: Config, tracker, data_fingerprint: str) -> dict[str, Any]:
    """Optuna search with one nested MLflow run per trial. Unless ``tune.study_name`` is set,
    the study is named after the config and the prepared data's fingerprint, so a retry or a
    rerun on the same data resumes it and new data (a scheduled run) starts a new study."""
    from esmm.tracking import TrialTracker
    from esmm.tune import config_for_params, tune_stage

    def trial_config(params: dict) -> Config:
        return config_for_params(
            config, params, epochs=config.tune.epochs, monitor=config.tune.metric
        )

    if config.tune.study_name is None:  # one study per data version: a rerun resumes it
        study_name = f"{config.name}-{data_fingerprint}"
        config = config.model_copy(
            update={"tune": config.tune.model_copy(update={"study_name": study_name})}
        )
    result = tune_stage(config, observer=TrialTracker(tracker, trial_config), progress=False)
    if result.outputs is not None:
        tracker.log_artifacts(result.outputs, "tuning")
    tracker.log_metrics({"tune_best_value": result.best_value})
    tracker.set_tags({"esmm.best_trial": result.best_trial_number, "esmm.study": result.study_name})
    return result.to_dict()


@task(name="train", cache_policy=NO_CACHE)
def train_best(config: Config, tracker) -> dict[str, Any]:
    """Train the best configuration in full; its epochs are logged to the parent run."""
    from esmm.train import train_stage

    _, result = train_stage(config, progress=False, callbacks=[tracker.epoch_logger()])
    tracker.log_metrics(
        {"best_epoch": result.best_epoch, f"best_val_{result.monitor}": result.best_value}
    )
    return {"best_epoch": result.best_epoch, "monitor": result.monitor, "value": result.best_value}


@task(
    name="evaluate",
    retries=SERVER_RETRIES,
    retry_delay_seconds=RETRY_DELAY_SECONDS,
    cache_policy=NO_CACHE,
)
def evaluate_model(config: Config, tracker) -> dict[str, float]:
    """Test metrics and ROC/calibration plots of the trained model, logged to the parent."""
    from esmm.evaluate import METRICS_FILE, PLOTS_FOLDER, evaluate_stage

    metrics = evaluate_stage(config)
    tracker.log_metrics(metrics, prefix="test_")
    tracker.log_artifacts(config.output_path / PLOTS_FOLDER, "plots")
    tracker.log_artifact(config.output_path / METRICS_FILE, "metrics")
    tracker.log_artifacts(config.output_path / "model" / "encoder", "encoder")
    return metrics


@task(
    name="register",
    retries=SERVER_RETRIES,
    retry_delay_seconds=RETRY_DELAY_SECONDS,
    cache_policy=NO_CACHE,
)
def register_model(config: Config, tracker, test_metrics: dict[str, float]) -> str:
    """Log the pyfunc model in the parent run and register it as a new version (once: a
    retry finds the version already created for this run)."""
    from esmm.prepare import load_prepared_split
    from esmm.registry import existing_version, register_version

    name = config.tracking.registered_model
    version = existing_version(tracker.client, name, tracker.run_id)
    if version is None:
        example = load_prepared_split(config, "test").slice(0, 100)
        model_uri = tracker.log_model(config.output_path / "model", example)
        version = register_version(tracker.client, model_uri, name, tracker.run_id, test_metrics)
    tracker.set_tags({"esmm.registered_version": version})
    return version


@task(
    name="promote",
    retries=SERVER_RETRIES,
    retry_delay_seconds=RETRY_DELAY_SECONDS,
    cache_policy=NO_CACHE,
)
def promote_model(config: Config, tracker, version: str) -> dict[str, Any]:
    """Score the new version and the champion on the current test split; move the aliases."""
    from esmm.prepare import load_prepared_split
    from esmm.registry import promote_version

    test_table = load_prepared_split(config, "test")
    decision = promote_version(
        tracker.client,
        tracker.uri,
        config.tracking.registered_model,
        version,
        test_table,
        config.promote,
    )
    tracker.set_tags(
        {"esmm.promotion": decision.decision, "esmm.promotion_reason": decision.reason}
    )
    return decision.to_dict()


@flow(name="esmm-pipeline", log_prints=True)
def esmm_pipeline(
    config_path: str = "conf/default.yaml",
    overrides: list[str] | None = None,
    append_simulated_day: bool = False,
) -> dict[str, Any]:
    """Validate, tune, train, evaluate, register and (if better) promote an ESMM model."""
    from esmm.tracking import Tracker, local_ui_command
    from esmm.tune import config_for_params

    config = load_config(config_path, overrides or [])
    tracker = Tracker.start(config)
    log.info("MLflow parent run %s (experiment %r)", tracker.run_id, config.tracking.experiment)
    try:
        source = load_data(config, append_simulated_day)
        validate_data(config, tracker)
        fingerprint = source["fingerprint"]
        refresh = not _prepared_folder_matches(config, fingerprint)
        manifest = prepare_data.with_options(refresh_cache=refresh)(config, fingerprint)
        files = [Path(f) for f in source["files"]]
        tracker.log_dataset(manifest, files[0] if len(files) == 1 else files[0].parent, config.name)
        tuning = tune_model(config, tracker, manifest["fingerprint"])
        best = config_for_params(config, tuning["best_params"])  # the config's own epochs
        tracker.log_params(  # the tuned values (the config's own stay as they were given)
            {
                "final.embedding_dim": best.model.embedding_dim,
                "final.tower_dims": best.model.tower_dims,
                "final.learning_rate": best.train.learning_rate,
                "final.batch_size": best.train.batch_size,
            }
        )
        train_best(best, tracker)
        metrics = evaluate_model(best, tracker)
        version = register_model(best, tracker, metrics)
        decision = promote_model(best, tracker, version)
    except BaseException:
        tracker.finish("FAILED")
        raise
    tracker.finish("FINISHED")
    return {
        "run_id": tracker.run_id,
        "experiment_id": tracker.experiment_id,
        "tracking_uri": tracker.uri,
        "model_name": config.tracking.registered_model,
        "version": version,
        "metrics": metrics,
        "best_params": tuning["best_params"],
        "decision": decision,
        "ui_command": local_ui_command(tracker.uri),
    }


def main(
    config: Annotated[Path, typer.Option("--config", "-c", help="YAML config.")] = Path(
        "conf/default.yaml"
    ),
    overrides: Annotated[
        list[str] | None, typer.Option("--set", "-s", help="Override a key (repeatable).")
    ] = None,
    append_day: Annotated[
        bool, typer.Option("--append-day", help="Simulator: append the next day first.")
    ] = False,
) -> None:
    """Run the esmm-pipeline flow once and print what it did."""
    from esmm.evaluate import metrics_table
    from esmm.progress import STDOUT, setup_logging

    setup_logging()
    result = esmm_pipeline(str(config), list(overrides or []), append_day)
    decision = result["decision"]
    STDOUT.print(metrics_table(result["metrics"], f"Test metrics (version {result['version']})"))
    STDOUT.print(f"MLflow parent run: {result['run_id']}  (store {result['tracking_uri']})")
    STDOUT.print(f"best parameters: {result['best_params']}")
    STDOUT.print(
        f"promotion: {result['model_name']} v{result['version']} -> @{decision['decision']}: "
        f"{decision['reason']}",
        markup=False,
    )
    STDOUT.print(f"open the MLflow UI: {result['ui_command']}  (then http://127.0.0.1:5000)")


if __name__ == "__main__":
    typer.run(main)
