"""`esmm tune`: the search space, resumable studies at a storage URL, kills, failures, pruning,
the observer hook and the refusal to mix studies, on a small simulated table."""

import contextlib
import signal
import sqlite3
import subprocess
import sys
import time
import warnings

import optuna
import pytest
import yaml
from optuna.trial import TrialState
from typer.testing import CliRunner

import esmm.tune
from esmm.cli import app
from esmm.config import Config, SearchSpace, load_config
from esmm.prepare import prepare
from esmm.train import EpochResult, TrainingDiverged, TrainingResult
from esmm.tune import (
    HISTORY_PLOT,
    IMPORTANCE_PLOT,
    SUMMARY_FILE,
    StudyMismatch,
    config_for_params,
    suggest_params,
    tune_stage,
)

PAPER_PARAMS = {"embedding_dim": 18, "tower_layers": 2, "tower_width_0": 200, "tower_width_1": 80}
SMALL = {
    "name": "tiny",
    "data": {"simulator": {"rows": 16000, "days": 4, "seed": 3}},
    "train": {"batch_size": 512, "learning_rate": 0.01, "threads": 1},
    "tune": {
        "n_trials": 2,
        "epochs": 2,
        "pruner": "none",
        "space": {"embedding_dim": [4, 8], "tower_layers": [1, 2], "tower_width": [8, 16]},
    },
}


@pytest.fixture(scope="module")
def prepared_dir(tmp_path_factory):
    """A prepared tiny simulated table, shared by every test (each has its own study)."""
    folder = tmp_path_factory.mktemp("tune-data")
    config_file = folder / "config.yaml"
    config_file.write_text(yaml.safe_dump({**SMALL, "output_dir": str(folder)}))
    result = CliRunner().invoke(app, ["simulate", "-c", str(config_file), "-q"])
    assert result.exit_code == 0, result.output
    return folder, prepare(load_config(config_file))


def small_config(tmp_path, **tune) -> Config:
    """The tiny config with its study and tuning outputs in ``tmp_path``; the prepared data
    is passed to tune_stage directly (the CLI test points output_dir at it instead)."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    raw = {**SMALL, "output_dir": str(tmp_path)}
    raw["tune"] = {**SMALL["tune"], "storage": storage, **tune}
    return Config.model_validate(raw)


def load(config: Config) -> optuna.Study:
    return optuna.load_study(
        study_name=config.tune.study_name or config.name, storage=config.tune.storage
    )


def finished(study: optuna.Study) -> list:
    return study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))


class RecordingObserver:
    """Records each trial's context: its params, the epochs it saw and how it ended."""

    def __init__(self):
        self.trials: dict[int, dict] = {}

    @contextlib.contextmanager
    def trial(self, number, params):
        record = self.trials[number] = {"params": params, "epochs": [], "error": None}
        try:
            yield lambda epoch: record["epochs"].append(epoch.epoch)
        except BaseException as error:
            record["error"] = error
            raise


def scripted_fit(values_per_call: list[float]):
    """A stand-in for esmm.train.fit whose n-th call reports values_per_call[n] every epoch:
    pruning and observer wiring tested without training."""
    calls = iter(values_per_call)

    def fake_fit(config, model_settings, encoder, train, val, *, callbacks, **_):
        value = next(calls)
        if value is None:
            raise TrainingDiverged("loss became nan at epoch 1, step 1/1")
        for epoch in range(1, config.train.epochs + 1):
            for callback in callbacks:
                callback(EpochResult(epoch, 0.1, {config.train.monitor: value}, 0.01, 1.0))
        return None, TrainingResult(best_epoch=1, best_value=value, monitor=config.train.monitor)

    return fake_fit


def test_the_space_holds_the_papers_setting():
    for space in (SearchSpace(), load_config("conf/default.yaml").tune.space):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a value outside the space only warns in FixedTrial
            params = suggest_params(optuna.trial.FixedTrial(PAPER_PARAMS), space)
        assert params == PAPER_PARAMS
        paper = config_for_params(Config(), params)
        assert (paper.model.embedding_dim, paper.model.tower_dims) == (18, [200, 80])


def test_config_for_params_maps_params_to_model_and_train_exactly():
    config = Config.model_validate(
        {"train": {"epochs": 7, "learning_rate": 0.002, "batch_size": 256, "patience": 3}}
    )
    params = {
        "embedding_dim": 12,
        "tower_layers": 3,
        "tower_width_0": 128,
        "tower_width_1": 64,
        "tower_width_2": 32,
        "learning_rate": 0.0005,
        "batch_size": 2048,
    }
    trial = config_for_params(config, params, epochs=2, monitor="val_loss")
    assert trial.model.embedding_dim == 12 and trial.model.tower_dims == [128, 64, 32]
    assert trial.train.learning_rate == 0.0005 and trial.train.batch_size == 2048
    assert trial.train.epochs == 2 and trial.train.monitor == "val_loss"
    assert trial.train.patience == 3 and trial.model.kind == config.model.kind

    final = config_for_params(config, {"embedding_dim": 8, "tower_layers": 1, "tower_width_0": 32})
    assert final.model.tower_dims == [32]
    assert final.train.epochs == 7 and final.train.monitor == config.train.monitor
    assert final.train.learning_rate == 0.002 and final.train.batch_size == 256
    assert config.model.tower_dims == [200, 80]  # the input config is left alone


def test_study_holds_n_trials_resumes_to_more_and_writes_outputs(tmp_path, prepared_dir):
    _, prepared = prepared_dir
    config = small_config(tmp_path)
    result = tune_stage(config, prepared, progress=False)
    study = load(config)
    assert len(finished(study)) == 2 and result.trials_run_now == 2
    assert result.complete == 2 and result.failed == 0 and result.study_name == "tiny"
    assert result.direction == "maximize" and result.best_value == study.best_value
    assert 0.5 < result.best_value <= 1
    assert all(trial.intermediate_values.keys() == {1, 2} for trial in study.trials)
    first = {trial.number: trial.value for trial in study.trials}

    more = small_config(tmp_path, n_trials=3)
    result = tune_stage(more, prepared, progress=False)
    study = load(config)
    assert result.trials_run_now == 1 and len(finished(study)) == 3
    assert {trial.number: trial.value for trial in study.trials[:2]} == first
    assert tune_stage(more, prepared, progress=False).trials_run_now == 0

    outputs = tmp_path / "tuning"
    assert result.outputs == outputs
    for name in (HISTORY_PLOT, IMPORTANCE_PLOT, SUMMARY_FILE):
        assert (outputs / name).stat().st_size > 0, name
    summary = (outputs / SUMMARY_FILE).read_text().splitlines()
    assert summary[0].startswith("number,state,value,duration_s,embedding_dim")
    assert len(summary) == 4 and not list(outputs.glob("*.tmp"))


def test_a_killed_run_resumes_without_losing_finished_trials(tmp_path, prepared_dir):
    folder, prepared = prepared_dir
    # Small batches make a trial take about a second, so the kill lands inside the study.
    config = small_config(tmp_path, n_trials=3, epochs=3)
    config.output_dir = str(folder)  # the worker reads the prepared data from there
    config.train.batch_size = 8
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    database = tmp_path / "optuna.db"
    worker = subprocess.Popen(
        [sys.executable, "-m", "esmm.cli", "tune", "-c", str(config_file), "-q"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:  # kill once a trial is recorded and the next one is running (with a heartbeat)
        deadline = time.monotonic() + 120
        while not {"COMPLETE", "RUNNING with heartbeat"} <= set(trial_states(database)):
            assert worker.poll() is None, worker.stdout.read().decode()
            assert time.monotonic() < deadline, "no trial finished in time"
            time.sleep(0.05)
        time.sleep(0.3)  # into the trial's first epoch: its params are drawn by then
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    before = {trial.number: trial for trial in load(config).trials}
    done_before = [n for n, trial in before.items() if trial.state == TrialState.COMPLETE]
    killed = [n for n, trial in before.items() if trial.state == TrialState.RUNNING]
    assert 1 <= len(done_before) < 3 and len(killed) == 1 and before[killed[0]].params

    # A short grace period, so the rerun finds the killed trial stale (its last heartbeat was
    # recorded when the trial started, at least 0.3 s before the kill).
    config.tune.heartbeat_seconds, config.tune.grace_seconds = 1, 2
    time.sleep(2.2)
    result = tune_stage(config, prepared, progress=False)
    study = load(config)
    assert len(finished(study)) == 3 and result.complete == 3 and result.failed == 1
    for number in done_before:
        assert study.trials[number].value == before[number].value
    # The killed trial ends FAIL and is retried once with its params.
    assert study.trials[killed[0]].state == TrialState.FAIL
    retries = [t for t in study.trials if t.system_attrs.get("failed_trial") == killed[0]]
    assert [(t.state, t.params) for t in retries] == [
        (TrialState.COMPLETE, before[killed[0]].params)
    ]


def trial_states(database) -> list[str]:
    """Each trial's state, read straight from the worker's SQLite file; a running trial whose
    heartbeat is recorded reads "RUNNING with heartbeat" (only those can be found stale)."""
    query = (
        "SELECT state || CASE WHEN state = 'RUNNING' AND EXISTS (SELECT 1 FROM trial_heartbeats"
        " h WHERE h.trial_id = t.trial_id) THEN ' with heartbeat' ELSE '' END FROM trials t"
    )
    if not database.exists():
        return []
    try:
        with contextlib.closing(sqlite3.connect(database, timeout=5)) as connection:
            return [row[0] for row in connection.execute(query)]
    except sqlite3.OperationalError:  # tables not created yet
        return []


def test_a_diverging_trial_is_recorded_fail_and_the_study_goes_on(
    tmp_path, prepared_dir, monkeypatch, caplog
):
    _, prepared = prepared_dir
    monkeypatch.setattr(esmm.tune, "fit", scripted_fit([None, 0.7, 0.8]))
    observer = RecordingObserver()
    config = small_config(tmp_path)
    with caplog.at_level("INFO", logger="esmm.tune"):
        result = tune_stage(config, prepared, observer=observer, progress=False)
    study = load(config)
    assert [trial.state for trial in study.trials] == [
        TrialState.FAIL,
        TrialState.COMPLETE,
        TrialState.COMPLETE,
    ]
    assert (result.failed, result.complete, result.best_value) == (1, 2, 0.8)
    assert result.best_trial_number == 2
    assert isinstance(observer.trials[0]["error"], TrainingDiverged)
    assert observer.trials[0]["epochs"] == [] and observer.trials[2]["epochs"] == [1, 2]
    assert observer.trials[1]["error"] is None
    assert observer.trials[1]["params"] == study.trials[1].params
    failed_lines = [r.getMessage() for r in caplog.records if "FAILED" in r.getMessage()]
    assert len(failed_lines) == 1 and "TrainingDiverged: loss became nan" in failed_lines[0]


def test_the_median_pruner_stops_a_clearly_worse_trial(tmp_path, prepared_dir, monkeypatch):
    _, prepared = prepared_dir
    monkeypatch.setattr(esmm.tune, "fit", scripted_fit([0.80, 0.82, 0.55]))
    encoded = []
    encode = prepared.encoder.encode_split
    monkeypatch.setattr(
        prepared.encoder, "encode_split", lambda table: encoded.append(1) or encode(table)
    )
    observer = RecordingObserver()
    config = small_config(tmp_path, n_trials=3, pruner="median", epochs=3)
    result = tune_stage(config, prepared, observer=observer, progress=False)
    bad = load(config).trials[2]
    assert bad.state == TrialState.PRUNED and bad.intermediate_values == {1: 0.55}
    assert (result.complete, result.pruned) == (2, 1)
    assert observer.trials[2]["epochs"] == [1]  # the observer saw the epoch before the prune
    assert isinstance(observer.trials[2]["error"], optuna.TrialPruned)
    assert observer.trials[0]["epochs"] == [1, 2, 3]
    assert len(encoded) == 2  # train and val encoded once for the run, not per trial


def test_a_resumed_study_does_not_replay_its_first_draws(tmp_path, prepared_dir, monkeypatch):
    _, prepared = prepared_dir
    monkeypatch.setattr(esmm.tune, "fit", scripted_fit([0.7, 0.8]))
    space = SearchSpace().model_dump()
    for n_trials in (1, 2):  # two runs of one trial each, with the same seed
        tune_stage(small_config(tmp_path, n_trials=n_trials, space=space), prepared, progress=False)
    first, second = load(small_config(tmp_path)).trials
    assert first.params != second.params


def test_a_study_made_for_other_settings_is_refused(tmp_path, prepared_dir, monkeypatch):
    _, prepared = prepared_dir
    monkeypatch.setattr(esmm.tune, "fit", scripted_fit([0.7, 0.8, 0.9]))
    tune_stage(small_config(tmp_path), prepared, progress=False)

    wider = {"embedding_dim": [4, 16], "tower_layers": [1, 2], "tower_width": [8, 16]}
    with pytest.raises(StudyMismatch) as refused:
        tune_stage(small_config(tmp_path, space=wider), prepared, progress=False)
    message = str(refused.value)
    assert "'tiny'" in message and str(tmp_path / "optuna.db") in message
    assert "search_space" in message and "tune.study_name" in message
    assert "data_fingerprint" not in message

    with pytest.raises(StudyMismatch, match="metric: study has 'cvr_auc_clicked'"):
        tune_stage(small_config(tmp_path, metric="val_loss"), prepared, progress=False)

    other_data = type(prepared)(
        prepared.tables, prepared.encoder, {**prepared.manifest, "fingerprint": "0" * 16}
    )
    with pytest.raises(StudyMismatch, match="data_fingerprint"):
        tune_stage(small_config(tmp_path), other_data, progress=False)
    assert len(load(small_config(tmp_path)).trials) == 2  # nothing was added


def test_the_cli_prints_the_best_params_and_refuses_without_prepared_data(tmp_path, prepared_dir):
    folder, _ = prepared_dir
    config = {**SMALL, "output_dir": str(folder)}
    config["tune"] = {**SMALL["tune"], "epochs": 1, "storage": f"sqlite:///{tmp_path / 'o.db'}"}
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["tune", "-c", str(config_file), "--trials", "1", "-q"])
    assert result.exit_code == 0, result.output
    assert "embedding_dim" in result.output and "cvr_auc_clicked" in result.output
    assert len(finished(load(load_config(config_file)))) == 1

    config_file.write_text(yaml.safe_dump({**SMALL, "output_dir": str(tmp_path / "empty")}))
    result = CliRunner().invoke(app, ["tune", "-c", str(config_file), "-q"])
    assert result.exit_code == 1 and "esmm prepare" in result.output
