"""Distributed tuning: workers in separate processes share one study and together finish
exactly `tune.n_trials`; a worker killed mid-trial leaves a FAIL trial that the others replace;
`esmm tune --workers N` on PostgreSQL and on SQLite. Tiny data, one epoch, 1 s heartbeats."""

import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter

import optuna
import pytest
import yaml
from optuna.trial import TrialState
from typer.testing import CliRunner

from esmm.cli import app
from esmm.prepare import PREPARED_FOLDER
from esmm.tune import SUMMARY_FILE, TUNING_FOLDER, WORKER_ATTR, storage_lock

pytestmark = pytest.mark.services

TINY = {
    "name": "distributed",
    "data": {"simulator": {"rows": 8000, "days": 4, "seed": 5}},
    "train": {"batch_size": 256, "learning_rate": 0.01, "threads": 1},
    "tune": {
        "epochs": 1,
        "pruner": "none",
        "heartbeat_seconds": 1,
        "grace_seconds": 3,
        "space": {"embedding_dim": [4, 8], "tower_layers": [1, 2], "tower_width": [8, 16]},
    },
}
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


@pytest.fixture(scope="module")
def prepared_folder(tmp_path_factory):
    """The tiny simulated table, prepared once; each test copies the prepared data."""
    folder = tmp_path_factory.mktemp("distributed-data")
    config_file = folder / "config.yaml"
    config_file.write_text(yaml.safe_dump({**TINY, "output_dir": str(folder)}))
    for command in (["simulate", "-q"], ["prepare"]):
        result = CliRunner().invoke(app, [*command, "-c", str(config_file)])
        assert result.exit_code == 0, result.output
    return folder / PREPARED_FOLDER


def write_config(tmp_path, prepared_folder, storage: str, train=None, **tune):
    """A config file whose output_dir (in tmp_path) holds a copy of the prepared data."""
    shutil.copytree(prepared_folder, tmp_path / PREPARED_FOLDER)
    raw = {**TINY, "output_dir": str(tmp_path)}
    raw["train"] = {**TINY["train"], **(train or {})}
    raw["tune"] = {**TINY["tune"], "storage": storage, **tune}
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(raw))
    return config_file


def start_worker(config_file, log_file) -> subprocess.Popen:
    with log_file.open("w") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "esmm.cli", "tune-worker", "-c", str(config_file), "-q"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def wait_ok(worker: subprocess.Popen, log_file, timeout: float = 150) -> None:
    assert worker.wait(timeout=timeout) == 0, log_file.read_text()


def load(storage: str) -> optuna.Study:
    return optuna.load_study(study_name=TINY["name"], storage=storage)


def flat(text: str) -> str:
    """Log text with rich's line wrapping (at 140 columns in a pipe) undone."""
    return " ".join(text.split())


def assert_exact(study: optuna.Study, n_trials: int) -> list:
    """Exactly n_trials finished, none left RUNNING, numbers 0..k without gaps or repeats."""
    trials = study.get_trials()
    states = Counter(trial.state for trial in trials)
    assert sum(states[state] for state in FINISHED) == n_trials, states
    assert states[TrialState.RUNNING] == 0 and states[TrialState.WAITING] == 0, states
    assert sorted(trial.number for trial in trials) == list(range(len(trials)))
    return trials


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_the_storage_lock_admits_one_worker_at_a_time(tmp_path, request, backend):
    if backend == "postgresql":
        url = request.getfixturevalue("postgres_database")("lock")
    else:
        url = f"sqlite:///{tmp_path / 'optuna.db'}"
    order = []

    def second_worker():
        with storage_lock(url):
            order.append("second holds it")

    with storage_lock(url):
        second = threading.Thread(target=second_worker)
        second.start()
        second.join(timeout=1.0)
        assert second.is_alive(), "the second holder did not wait"
        order.append("first releases it")
    second.join(timeout=10)
    assert order == ["first releases it", "second holds it"]


def test_two_workers_finish_exactly_the_requested_trials(
    tmp_path, prepared_folder, postgres_database
):
    storage = postgres_database("tune")
    config_file = write_config(tmp_path, prepared_folder, storage, {"batch_size": 8}, n_trials=6)
    logs = [tmp_path / f"worker{i}.log" for i in range(2)]
    workers = [start_worker(config_file, log) for log in logs]
    for worker, log in zip(workers, logs, strict=True):
        wait_ok(worker, log)
    trials = assert_exact(load(storage), 6)
    assert all(trial.state == TrialState.COMPLETE for trial in trials)
    # Both usually take trials; one that started late may find them all taken.
    marks = {trial.user_attrs[WORKER_ATTR] for trial in trials}
    assert marks <= {worker_mark(worker) for worker in workers}, marks
    for log in logs:  # a worker stops only once the study is done
        assert "6 complete, 0 pruned, 0 failed" in flat(log.read_text())


def test_a_worker_killed_mid_trial_is_replaced_by_the_others(
    tmp_path, prepared_folder, postgres_database
):
    storage = postgres_database("tune")
    # Batches of 2 make a trial last a second or two, so the kill lands inside one.
    config_file = write_config(tmp_path, prepared_folder, storage, {"batch_size": 2}, n_trials=4)
    logs = [tmp_path / f"worker{i}.log" for i in range(2)]
    workers = [start_worker(config_file, log) for log in logs]
    killed = None
    try:  # kill the worker of the first trial seen running (with its heartbeat and mark)
        deadline = time.monotonic() + 120
        while killed is None:
            assert time.monotonic() < deadline, "no trial started in time"
            time.sleep(0.05)
            killed = next(iter(_running_trials(storage)), None)
    finally:
        marks = [worker_mark(worker) for worker in workers]
        victim = marks.index(killed.user_attrs[WORKER_ATTR]) if killed else None
        for index, worker in enumerate(workers):
            if victim in (None, index):
                worker.send_signal(signal.SIGKILL)
                worker.wait()
    assert load(storage).trials[killed.number].state == TrialState.RUNNING  # killed inside it

    survivor = 1 - victim
    wait_ok(workers[survivor], logs[survivor])
    trials = assert_exact(load(storage), 4)
    assert trials[killed.number].state == TrialState.FAIL
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
    assert [(t.state, t.params) for t in retries] == [(TrialState.COMPLETE, killed.params)]
    replaced = f"trial(s) #{killed.number} of a stopped worker marked FAIL"
    assert replaced in flat(logs[survivor].read_text())


def worker_mark(worker: subprocess.Popen) -> str:
    return f"{socket.gethostname()}:{worker.pid}"


def _running_trials(storage: str) -> list:
    """RUNNING trials marked by their worker (their first heartbeat is recorded by then)."""
    try:
        study = load(storage)
    except KeyError:  # the workers have not created the study yet
        return []
    running = study.get_trials(states=(TrialState.RUNNING,))
    return [trial for trial in running if WORKER_ATTR in trial.user_attrs]


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_tune_with_workers_reports_the_study_and_writes_the_summary_once(
    tmp_path, prepared_folder, request, backend
):
    if backend == "postgresql":
        storage = request.getfixturevalue("postgres_database")("tune")
    else:
        storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    config_file = write_config(tmp_path, prepared_folder, storage, n_trials=3)
    result = CliRunner().invoke(app, ["tune", "-c", str(config_file), "--workers", "2", "-q"])
    assert result.exit_code == 0, result.output
    assert "[worker 0]" in result.output and "[worker 1]" in result.output
    output = flat(result.output)
    assert "Best of study 'distributed'" in output and "3 complete, 0 pruned, 0 failed" in output
    assert "marked FAIL" not in output
    assert_exact(load(storage), 3)
    summary = (tmp_path / TUNING_FOLDER / SUMMARY_FILE).read_text().splitlines()
    assert len(summary) == 4 and all(",COMPLETE," in row for row in summary[1:])

    # A rerun finds the study complete: no worker is started, nothing is added.
    result = CliRunner().invoke(app, ["tune", "-c", str(config_file), "--workers", "2", "-q"])
    assert result.exit_code == 0, result.output
    assert "[worker" not in result.output and len(load(storage).trials) == 3
