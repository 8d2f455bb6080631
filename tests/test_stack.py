"""`esmm stack`: the team set-up's servers as local processes. Fast checks of what it hands out
(no password anywhere, clear messages for missing or dead state), then the real thing: MLflow
and Prefect on fresh PostgreSQL databases, stopped and started again, keep runs, model
versions, aliases, artifacts and flow runs; `esmm stack down` leaves no process behind."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from dataclasses import asdict
from pathlib import Path

import pytest
from typer.testing import CliRunner

from esmm.cli import app
from esmm.stack import (
    SERVICES_BY_NAME,
    STATE_FILE,
    ServiceProcess,
    Stack,
    StackSettings,
    is_running,
    process_values,
    read_state,
    running_stack,
    service_command,
    stop_stack,
)

SECRET = "stack-test-not-a-secret"  # the local server trusts 127.0.0.1, so any password works
MODEL = "esmm-stack-test"


def test_urls_and_commands_carry_no_password(tmp_path):
    settings = StackSettings(
        folder=tmp_path, postgres_url=f"postgresql://alice:{SECRET}@db.internal:6543/postgres"
    )
    values = process_values(settings)
    assert SECRET not in json.dumps(values)
    assert values["optuna_store"] == "postgresql+psycopg2://alice@db.internal:6543/esmm_optuna"
    assert values["prefect_store"].startswith("postgresql+asyncpg://alice@db.internal:6543/")
    mlflow = service_command(SERVICES_BY_NAME["mlflow"], values)
    assert mlflow[mlflow.index("--host") + 1] == "127.0.0.1"
    assert mlflow[mlflow.index("--artifacts-destination") + 1] == str(
        tmp_path.resolve() / "mlflow-artifacts"
    )


def test_status_and_down_explain_a_missing_or_broken_state(tmp_path):
    runner = CliRunner()
    down = runner.invoke(app, ["stack", "down", "--folder", str(tmp_path)])
    assert down.exit_code == 0 and "nothing to stop" in down.output
    status = runner.invoke(app, ["stack", "status", "--folder", str(tmp_path)])
    assert status.exit_code == 1 and "no stack recorded" in status.output
    (tmp_path / STATE_FILE).write_text("{not json")
    broken = runner.invoke(app, ["stack", "down", "--folder", str(tmp_path)])
    assert broken.exit_code == 1 and "is not a stack state file" in broken.output


def test_down_reports_servers_that_already_stopped(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    gone.wait()
    stack = Stack(
        folder=str(tmp_path),
        mlflow_url="http://127.0.0.1:1",
        prefect_api_url="http://127.0.0.1:2/api",
        tune_storage="postgresql+psycopg2://postgres@127.0.0.1:5432/esmm_optuna",
        databases=[],
        processes=[ServiceProcess("mlflow", gone.pid, None, "u", "u/health", "log")],
    )
    (tmp_path / STATE_FILE).write_text(json.dumps(asdict(stack)))
    assert read_state(tmp_path) == stack
    assert stop_stack(tmp_path) == {"mlflow": "had already stopped"}
    assert not (tmp_path / STATE_FILE).exists()


def _api(url: str, payload: dict | None = None) -> dict:
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request) as answer:
        return json.loads(answer.read())


def _esmm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "esmm.cli", "stack", *args],
        capture_output=True,
        text=True,
        timeout=240,
    )


def _every_text_it_wrote(folder: Path, pids: list[int]) -> str:
    texts = [path.read_text(errors="replace") for path in folder.rglob("*.log")]
    texts += [path.read_text() for path in folder.glob(STATE_FILE)]
    for pid in pids:
        cmdline = Path(f"/proc/{pid}/cmdline")
        if cmdline.exists():
            texts.append(cmdline.read_bytes().decode(errors="replace"))
    return "\n".join(texts)


@pytest.mark.services
@pytest.mark.slow
def test_stack_keeps_everything_across_a_restart_and_stops_cleanly(tmp_path, database_prefix):
    from mlflow.tracking import MlflowClient

    folder = tmp_path / "stack"
    postgres_url = f"postgresql://postgres:{SECRET}@127.0.0.1:5432/postgres"
    with running_stack(
        folder, postgres_url, database_prefix=database_prefix, mlflow_port=0, prefect_port=0
    ) as stack:
        assert {p.name for p in stack.processes} == {"mlflow", "prefect-server"}
        client = MlflowClient(stack.mlflow_url, stack.mlflow_url)
        experiment = client.create_experiment("stack-test")
        run_id = client.create_run(experiment).info.run_id
        client.log_param(run_id, "model.embedding_dim", "18")
        for step, auc in enumerate([0.61, 0.67]):
            client.log_metric(run_id, "val_cvr_auc_clicked", auc, step=step)
        notes = tmp_path / "model" / "notes.txt"
        notes.parent.mkdir()
        notes.write_text("served by the tracking server")
        client.log_artifacts(run_id, str(notes.parent), "model")
        client.set_terminated(run_id)
        client.create_registered_model(MODEL)
        version = client.create_model_version(MODEL, f"runs:/{run_id}/model", run_id).version
        client.set_registered_model_alias(MODEL, "champion", version)
        flow = _api(f"{stack.prefect_api_url}/flows/", {"name": "stack-test"})
        flow_run = _api(
            f"{stack.prefect_api_url}/flow_runs/", {"flow_id": flow["id"], "name": "kept"}
        )
        assert _api(f"{stack.prefect_api_url}/health") is True
        first = [p.pid for p in stack.processes]
        assert SECRET not in _every_text_it_wrote(folder, first)
    assert not any(is_running(p) for p in stack.processes)
    assert list((folder / "mlflow-artifacts").rglob("notes.txt"))  # served into our folder

    ports = {p.name: p.url.rsplit(":", 1)[1] for p in stack.processes}
    up = _esmm(
        "up",
        "--folder",
        str(folder),
        "--postgres-url",
        postgres_url,
        "--database-prefix",
        database_prefix,
        "--mlflow-port",
        ports["mlflow"],
        "--prefect-port",
        ports["prefect-server"],
    )
    try:
        assert up.returncode == 0, up.stderr
        assert f"export MLFLOW_TRACKING_URI={stack.mlflow_url}" in up.stdout
        assert f"tune.storage={stack.tune_storage}" in up.stdout
        restarted = read_state(folder)
        status = _esmm("status", "--folder", str(folder))
        assert status.returncode == 0 and status.stdout.count(": healthy") == 2, status.stdout

        client = MlflowClient(restarted.mlflow_url, restarted.mlflow_url)
        run = client.get_run(run_id)
        assert run.data.params == {"model.embedding_dim": "18"}
        history = client.get_metric_history(run_id, "val_cvr_auc_clicked")
        assert [(m.step, m.value) for m in history] == [(0, 0.61), (1, 0.67)]
        copy = client.download_artifacts(run_id, "model/notes.txt", str(tmp_path))
        assert Path(copy).read_text() == "served by the tracking server"
        assert client.get_model_version_by_alias(MODEL, "champion").version == version
        kept = _api(f"{restarted.prefect_api_url}/flow_runs/{flow_run['id']}")
        assert kept["name"] == "kept" and kept["flow_id"] == flow["id"]
        pids = [p.pid for p in restarted.processes]
        assert SECRET not in _every_text_it_wrote(folder, pids)
    finally:
        down = _esmm("down", "--folder", str(folder))
    assert down.returncode == 0 and down.stdout.count(": stopped") == 2, down.stdout
    assert not any(is_running(p) for p in restarted.processes)
    assert not (folder / STATE_FILE).exists()
