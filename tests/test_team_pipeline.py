"""The pipeline on the team set-up: a real Prefect server and a real MLflow server, both on
PostgreSQL, and Optuna on PostgreSQL (esmm.stack starts them as local processes). Results are
read back through the servers' APIs. Then the fault: the MLflow server stops during a run; the
flow fails after its retries, nothing is registered, and the restarted servers still hold every
earlier run, version and alias."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from esmm.registry import aliases_of
from esmm.stack import running_stack, stop_stack

ROOT = Path(__file__).resolve().parents[1]
MODEL_NAME = "esmm-cvr-team-test"

pytestmark = [pytest.mark.services, pytest.mark.slow]


def pipeline_command(stack, output_dir: Path) -> list[str]:
    settings = {
        "name": "team-test",
        "output_dir": str(output_dir),
        "data.simulator.rows": "40000",
        "data.simulator.days": "4",
        "validation.min_rows": "1000",
        "validation.data_docs": "false",
        "train.epochs": "2",
        "train.batch_size": "256",
        "train.learning_rate": "0.005",
        "tune.n_trials": "2",
        "tune.epochs": "1",
        "tune.space.embedding_dim": "[4, 8]",
        "tune.space.tower_layers": "[1, 1]",
        "tune.space.tower_width": "[16, 32]",
        "tracking.experiment": "team-test",
        "tracking.registered_model": MODEL_NAME,
        "promote.calibration_range": "[0.2, 5.0]",
    }
    overrides = [f"{key}={value}" for key, value in settings.items()]
    overrides += stack.config_overrides()  # tracking.tracking_uri, tune.storage
    command = [sys.executable, "-m", "flows.pipeline", "-c", str(ROOT / "conf/default.yaml")]
    return command + [arg for override in overrides for arg in ("--set", override)]


def pipeline_environment(stack, workspace: Path) -> dict[str, str]:
    return {
        **os.environ,
        **stack.environment(),  # MLFLOW_TRACKING_URI, PREFECT_API_URL
        "PREFECT_HOME": str(workspace / "prefect-client"),
        # fail fast when a server is gone: the flow's own task retries are what is tested
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    }


def prefect_flow_runs(api_url: str) -> list[dict]:
    request = urllib.request.Request(
        f"{api_url}/flow_runs/filter",
        json.dumps({"limit": 50}).encode(),
        {"Content-Type": "application/json"},
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=10) as answer:
        return json.loads(answer.read())


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("team")


@pytest.fixture(scope="module")
def stack(workspace, database_prefix):
    with running_stack(workspace / "stack", database_prefix=database_prefix) as started:
        yield started


@pytest.fixture(scope="module")
def first_run(stack, workspace) -> subprocess.CompletedProcess:
    return subprocess.run(
        pipeline_command(stack, workspace / "out-1"),
        env=pipeline_environment(stack, workspace),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_pipeline_on_the_servers_is_read_back_through_their_apis(stack, first_run):
    import optuna
    from mlflow.tracking import MlflowClient

    assert first_run.returncode == 0, first_run.stderr[-3000:]
    assert "-> @champion" in first_run.stdout

    client = MlflowClient(stack.mlflow_url, stack.mlflow_url)
    experiment = client.get_experiment_by_name("team-test")
    runs = client.search_runs([experiment.experiment_id], "tags.`esmm.stage` = 'pipeline'")
    assert len(runs) == 1
    parent = runs[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["tracking.tracking_uri"] == stack.mlflow_url
    history = client.get_metric_history(parent.info.run_id, "val_cvr_auc_clicked")
    assert [m.step for m in history] == [1, 2]
    trials = client.search_runs(
        [experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert len(trials) == 2
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"config", "validation", "tuning", "plots", "encoder"} <= artifacts  # via the server

    assert aliases_of(client, MODEL_NAME) == {"champion": "1"}
    version = client.get_model_version(MODEL_NAME, "1")
    assert version.run_id == parent.info.run_id
    assert version.tags["promotion.decision"] == "champion"

    flow_runs = prefect_flow_runs(stack.prefect_api_url)
    assert [run["state_type"] for run in flow_runs] == ["COMPLETED"]

    studies = optuna.get_all_study_summaries(stack.tune_storage)
    assert len(studies) == 1 and studies[0].n_trials == 2


def test_mlflow_server_stopped_mid_run_fails_the_flow_and_registers_nothing(
    stack, first_run, workspace, database_prefix
):
    from mlflow.tracking import MlflowClient

    assert first_run.returncode == 0
    output_dir = workspace / "out-2"
    flow = subprocess.Popen(
        pipeline_command(stack, output_dir),
        env=pipeline_environment(stack, workspace),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    # evaluate writes metrics.json, then logs to MLflow: stop the server in between
    metrics_file = output_dir / "metrics.json"
    deadline = time.monotonic() + 600
    while not metrics_file.exists():
        assert flow.poll() is None, flow.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "the second run never reached evaluate"
        time.sleep(0.2)
    mlflow_server = next(p for p in stack.processes if p.name == "mlflow")
    os.killpg(mlflow_server.pid, signal.SIGTERM)

    output, _ = flow.communicate(timeout=600)
    assert flow.returncode != 0
    assert "Retries are exhausted" in output or "retries" in output.lower(), output[-3000:]
    assert "register-" not in output  # the flow never reached registration

    stop_stack(Path(stack.folder))
    with running_stack(workspace / "stack", database_prefix=database_prefix) as restarted:
        client = MlflowClient(restarted.mlflow_url, restarted.mlflow_url)
        versions = client.search_model_versions(f"name = '{MODEL_NAME}'")
        assert [v.version for v in versions] == ["1"]
        assert aliases_of(client, MODEL_NAME) == {"champion": "1"}
        experiment = client.get_experiment_by_name("team-test")
        runs = client.search_runs([experiment.experiment_id], "tags.`esmm.stage` = 'pipeline'")
        assert len(runs) == 2  # the first run and the failed one, both kept by PostgreSQL
        finished = [r for r in runs if r.info.status == "FINISHED"]
        assert len(finished) == 1 and finished[0].info.run_id == versions[0].run_id
        states = sorted(run["state_type"] for run in prefect_flow_runs(restarted.prefect_api_url))
        assert states == ["COMPLETED", "FAILED"]
