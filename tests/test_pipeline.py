"""End to end: the Prefect flow on a small simulated table, with a temporary Prefect server,
MLflow and Optuna on SQLite files in a temporary folder. Checks the MLflow runs, the registry
aliases and decisions, scoring from the registry in a fresh process, rollback, bad data
stopping the flow at validation, and the deployment's schedule read back from Prefect."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from esmm.registry import aliases_of

ROOT = Path(__file__).resolve().parents[1]
MODEL_NAME = "esmm-cvr-test"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("pipeline")


@pytest.fixture(scope="module")
def prefect_server(workspace):
    """A temporary Prefect API (its own database), as a scheduled deployment would use."""
    os.environ["PREFECT_HOME"] = str(workspace / "prefect")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


def overrides(workspace: Path, **extra: str) -> list[str]:
    settings = {
        "name": "pipeline-test",
        "output_dir": str(workspace / "out"),
        "data.simulator.rows": "40000",
        "data.simulator.days": "4",
        "validation.min_rows": "1000",
        "train.epochs": "2",
        "train.batch_size": "256",
        "train.learning_rate": "0.005",
        "tune.n_trials": "2",
        "tune.epochs": "1",
        "tune.storage": f"sqlite:///{workspace}/optuna.db",
        "tune.space.embedding_dim": "[4, 8]",
        "tune.space.tower_layers": "[1, 1]",
        "tune.space.tower_width": "[16, 32]",
        "tracking.tracking_uri": f"sqlite:///{workspace}/mlflow/mlflow.db",
        "tracking.experiment": "pipeline-test",
        "tracking.registered_model": MODEL_NAME,
    }
    settings |= extra
    return [f"{key}={value}" for key, value in settings.items()]


def client_for(workspace: Path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{workspace}/mlflow/mlflow.db"
    return MlflowClient(uri, uri)


@pytest.fixture(scope="module")
def first_run(workspace, prefect_server) -> dict:
    from flows.pipeline import esmm_pipeline

    return esmm_pipeline(str(ROOT / "conf/default.yaml"), overrides(workspace))


def test_first_run_logs_parent_and_trials_and_becomes_champion(workspace, first_run):
    client = client_for(workspace)
    parent = client.get_run(first_run["run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.params["train.batch_size"] == "256"
    assert parent.data.params["data.simulator.rows"] == "40000"
    assert parent.data.tags["esmm.model_kind"] == "esmm"
    assert len(parent.data.tags["esmm.data_fingerprint"]) == 16
    history = client.get_metric_history(parent.info.run_id, "val_cvr_auc_clicked")
    assert [m.step for m in history] == [1, 2]
    assert 0.5 < parent.data.metrics["test_cvr_auc_clicked"] < 1.0
    assert parent.inputs.dataset_inputs[0].dataset.digest
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"config", "validation", "tuning", "plots", "encoder"} <= artifacts
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert {"plots/roc.png", "plots/calibration.png"} <= plots
    tuning = {a.path for a in client.list_artifacts(parent.info.run_id, "tuning")}
    assert "tuning/optimization_history.png" in tuning

    trials = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert len(trials) == 2
    for trial in trials:
        assert trial.data.params["search.embedding_dim"] in {"4", "8"}
        assert trial.data.params["model.embedding_dim"] == trial.data.params["search.embedding_dim"]
        assert client.get_metric_history(trial.info.run_id, "val_cvr_auc_clicked")[0].step == 1

    decision = first_run["decision"]
    assert decision["decision"] == "champion", decision["reason"]
    assert aliases_of(client, MODEL_NAME) == {"champion": "1"}
    version = client.get_model_version(MODEL_NAME, "1")
    assert version.tags["promotion.decision"] == "champion"
    assert float(version.tags["test.cvr_auc_clicked"]) == pytest.approx(
        first_run["metrics"]["cvr_auc_clicked"], abs=1e-6
    )


def test_champion_scores_raw_rows_in_a_fresh_process(workspace, first_run, tmp_path):
    """models:/<name>@champion loads with mlflow.pyfunc in a new interpreter and scores rows
    of the canonical table (raw ids, lists for multi-valued fields)."""
    table = pq.read_table(workspace / "out/prepared/test.parquet").slice(0, 50)
    rows = tmp_path / "rows.parquet"
    pq.write_table(table, rows)
    script = f"""
import mlflow, pandas as pd, pyarrow.parquet as pq
mlflow.set_tracking_uri("sqlite:///{workspace}/mlflow/mlflow.db")
model = mlflow.pyfunc.load_model("models:/{MODEL_NAME}@champion")
scores = model.predict(pq.read_table("{rows}").to_pandas())
print(scores.to_json(orient="records"))
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True
    )
    scores = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(scores) == 50
    for row in scores:
        assert 0 <= row["pctr"] <= 1 and 0 <= row["pcvr"] <= 1
        assert row["pctcvr"] == pytest.approx(row["pctr"] * row["pcvr"], rel=1e-5)


@pytest.fixture(scope="module")
def worse_run(workspace, first_run) -> dict:
    from flows.pipeline import esmm_pipeline

    manifest = workspace / "out/prepared/manifest.json"
    before = manifest.stat().st_mtime_ns
    worse = overrides(
        workspace,
        **{
            "tune.study_name": "worse",
            "tune.n_trials": "1",
            "tune.space.embedding_dim": "[1]",
            "tune.space.tower_width": "[1]",
            "train.epochs": "1",
            "train.learning_rate": "0.00001",
        },
    )
    result = esmm_pipeline(str(ROOT / "conf/default.yaml"), worse)
    result["prepared_reused"] = manifest.stat().st_mtime_ns == before
    return result


def test_worse_run_is_registered_but_not_promoted(workspace, worse_run):
    client = client_for(workspace)
    assert worse_run["version"] == "2"
    assert worse_run["decision"]["decision"] == "challenger"
    aliases = aliases_of(client, MODEL_NAME)
    assert aliases == {"champion": "1", "challenger": "2"}
    tags = client.get_model_version(MODEL_NAME, "2").tags
    assert tags["promotion.decision"] == "challenger"
    assert tags["promotion.champion_version"] == "1"
    reason = tags["promotion.reason"]
    assert "cvr_auc_clicked" in reason or "guardrails failed" in reason
    decision_file = "promotion/decision-v2.md"
    text = client.download_artifacts(worse_run["run_id"], decision_file)
    assert "challenger" in Path(text).read_text()
    assert worse_run["prepared_reused"], "same input: the prepared data should come from cache"


def test_forced_promotion_then_rollback(workspace, worse_run):
    from esmm.cli import app

    client = client_for(workspace)
    args = ["-c", str(ROOT / "conf/default.yaml")]
    for item in overrides(workspace, **{"promote.calibration_range": "[0.0001, 10000]"}):
        args += ["--set", item]
    forced = CliRunner().invoke(app, ["promote", *args, "--version", "2", "--force"])
    assert forced.exit_code == 0, forced.output
    assert aliases_of(client, MODEL_NAME) == {"champion": "2", "previous": "1"}
    assert client.get_model_version(MODEL_NAME, "2").tags["promotion.forced"] == "true"

    rolled = CliRunner().invoke(app, ["rollback", *args])
    assert rolled.exit_code == 0, rolled.output
    assert aliases_of(client, MODEL_NAME) == {"champion": "1"}
    assert client.get_model_version(MODEL_NAME, "2").tags["promotion.decision"] == "rolled_back"

    again = CliRunner().invoke(app, ["rollback", *args])
    assert again.exit_code == 1
    assert "no @previous version" in again.output


def _bad(table: pa.Table, problem: str) -> pa.Table:
    import numpy as np

    if problem == "missing column":
        return table.drop_columns(["item_id"])
    if problem == "label of 2":
        click = table["click"].to_numpy().copy()
        click[:5] = 2
        return table.set_column(table.schema.get_field_index("click"), "click", pa.array(click))
    if problem == "conversion without click":
        conversion = table["conversion"].to_numpy().copy()
        unclicked = np.flatnonzero(table["click"].to_numpy() == 0)[:7]
        conversion[unclicked] = 1
        index = table.schema.get_field_index("conversion")
        return table.set_column(index, "conversion", pa.array(conversion))
    if problem == "nulls":
        values = table["user_id"].to_pylist()
        values[:3] = [None] * 3
        index = table.schema.get_field_index("user_id")
        return table.set_column(index, "user_id", pa.array(values, table["user_id"].type))
    if problem == "click rate":
        click = np.ones(table.num_rows, dtype=table["click"].type.to_pandas_dtype())
        return table.set_column(table.schema.get_field_index("click"), "click", pa.array(click))
    raise ValueError(problem)


EXPECTED_IN_MESSAGE = {
    "missing column": "item_id",
    "label of 2": "click",
    "conversion without click": "conversion",
    "nulls": "user_id",
    "click rate": "click",
}


@pytest.mark.parametrize("problem", list(EXPECTED_IN_MESSAGE))
def test_bad_data_stops_the_flow_at_validation(workspace, worse_run, problem, tmp_path):
    from flows.pipeline import esmm_pipeline

    client = client_for(workspace)
    before = (
        aliases_of(client, MODEL_NAME),
        len(client.search_model_versions(f"name = '{MODEL_NAME}'")),
    )
    good = pq.read_table(workspace / "out/impressions.parquet")
    bad_path = tmp_path / "bad.parquet"
    pq.write_table(_bad(good, problem), bad_path)
    bad = overrides(
        workspace,
        **{"output_dir": str(tmp_path / "out"), "data.path": str(bad_path)},
    )
    with pytest.raises(Exception) as raised:
        esmm_pipeline(str(ROOT / "conf/default.yaml"), bad)
    message = str(raised.value)
    assert "expect" in message and EXPECTED_IN_MESSAGE[problem] in message, message
    after = (
        aliases_of(client, MODEL_NAME),
        len(client.search_model_versions(f"name = '{MODEL_NAME}'")),
    )
    assert after == before
    failed = client.search_runs(
        [client.get_experiment_by_name("pipeline-test").experiment_id],
        "attributes.status = 'FAILED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )[0]
    assert failed.data.tags["esmm.failed_stage"] == "validate"
    assert not (tmp_path / "out/model").exists()


def test_deployment_schedule_is_read_back_from_prefect(prefect_server):
    from prefect import get_client

    from flows.deploy import build_deployment

    deployment_id = build_deployment("conf/default.yaml", cron="15 4 * * *", window_days=6).apply()

    async def read():
        async with get_client() as client:
            return await client.read_deployment(deployment_id)

    import asyncio

    deployment = asyncio.run(read())
    assert deployment.name == "daily"
    assert [s.schedule.cron for s in deployment.schedules] == ["15 4 * * *"]
    assert deployment.parameters["overrides"] == ["data.window_days=6"]
    assert deployment.parameters["append_simulated_day"] is True
