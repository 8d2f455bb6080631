"""Stage `tune`: an Optuna search over the embedding size and the tower shape (and the learning
rate and batch size when the config asks), scored on the validation split.

The study lives in a database (``tune.storage``; SQLite under ``output_dir`` by default,
PostgreSQL for workers on many machines) under a name (``tune.study_name``), so a rerun resumes
it: it runs only the trials still missing to reach ``tune.n_trials`` finished ones. Any number
of workers (``tune_worker``; ``tune_stage`` is one of them) may share a study and together
finish exactly ``tune.n_trials``: each creates its next trial under a lock of the storage, and
only while the finished trials plus those running elsewhere fall short. A worker killed
mid-trial leaves its trial RUNNING; once its heartbeat has been silent for
``tune.grace_seconds``, the next worker marks it FAIL and queues one retry with the same
parameters. A study remembers the data and the search it was made for, and a run with other
data or another search is refused rather than mixed into it.

The final model is trained by the pipeline from ``best_params`` with ``config_for_params``.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any, Protocol

import optuna
import sqlalchemy
from optuna.exceptions import ExperimentalWarning
from optuna.trial import TrialState

from esmm.atomic import atomic_path
from esmm.config import Config, ConfigError, SearchSpace, TuneSettings, dump_config
from esmm.data.encode import EncodedSplit, FeatureEncoder
from esmm.prepare import PreparedData, load_manifest, load_prepared
from esmm.train import LOWER_IS_BETTER, EpochResult, fit, monitor_for

log = logging.getLogger(__name__)

TUNING_FOLDER = "tuning"
SUMMARY_FILE = "study_summary.csv"
HISTORY_PLOT = "optimization_history.png"
IMPORTANCE_PLOT = "param_importances.png"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
# A trial whose heartbeat fell silent (tune.grace_seconds) becomes FAIL and is retried once.
STALE_TRIAL_RETRIES = 1
# Marks a RUNNING trial as reserved by a live worker ("host:pid"), set after its first heartbeat.
WORKER_ATTR = "worker"
# The pg_advisory_xact_lock key every esmm worker of a PostgreSQL storage takes.
ADVISORY_LOCK_KEY = int.from_bytes(
    hashlib.sha256(b"esmm.tune storage lock").digest()[:8], "big", signed=True
)
SQLITE_BUSY_TIMEOUT_S = 60  # local workers take turns writing one SQLite file
MAX_WAIT_POLL_S = 5.0  # how often a worker whose missing trials all run elsewhere looks again
WORKER_STOP_TIMEOUT_S = 10  # per step of stopping a local worker early
# Optuna's default (5) would leave a study of a handful of trials almost never pruned.
MEDIAN_STARTUP_TRIALS = 2


class StudyMismatch(ValueError):
    """The stored study was made for other data or another search; its trials are not
    comparable with this run's."""


class TuningFailed(RuntimeError):
    """No trial of the study completed, so there is no best configuration to train."""


class TrialObserver(Protocol):
    """Wraps each trial from outside (the MLflow tracking layer), so this module needs no
    tracking import. ``trial`` is entered around the trial's training; the callback it yields
    is called with every epoch's result (before the pruning check); the context is exited with
    ``optuna.TrialPruned`` or the trial's error when the trial is pruned or fails."""

    def trial(
        self, number: int, params: dict[str, Any]
    ) -> contextlib.AbstractContextManager[Callable[[EpochResult], None]]: ...


@dataclass
class TuneResult:
    study_name: str
    storage: str
    metric: str
    direction: str  # "maximize" or "minimize"
    best_params: dict[str, Any]
    best_value: float
    best_trial_number: int
    complete: int
    pruned: int
    failed: int
    trials_run_now: int
    outputs: Path | None = None  # the folder with the plots and study_summary.csv

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["outputs"] = str(self.outputs) if self.outputs else None
        return data


def suggest_params(trial: optuna.Trial, space: SearchSpace) -> dict[str, Any]:
    """Draw one point of ``space``: a width per tower layer (``tower_width_0``, ...), the
    learning rate (log-uniform) and batch size only where the space lists them."""
    trial.suggest_categorical("embedding_dim", space.embedding_dim)
    layers = trial.suggest_int("tower_layers", *space.tower_layers)
    for layer in range(layers):
        trial.suggest_categorical(f"tower_width_{layer}", space.tower_width)
    if space.learning_rate is not None:
        trial.suggest_float("learning_rate", *space.learning_rate, log=True)
    if space.batch_size is not None:
        trial.suggest_categorical("batch_size", space.batch_size)
    return dict(trial.params)


def tower_dims(params: dict[str, Any]) -> list[int]:
    return [int(params[f"tower_width_{layer}"]) for layer in range(int(params["tower_layers"]))]


def config_for_params(
    config: Config,
    params: dict[str, Any],
    *,
    epochs: int | None = None,
    monitor: str | None = None,
) -> Config:
    """The config that trains ``params`` (a trial's, or a study's ``best_params`` for the final
    model): model size from the params, learning rate and batch size where searched, the rest
    from ``config``. Trials pass tune's ``epochs`` and ``monitor``; the final training keeps the
    config's own. Validated, so a hand-written ``params`` cannot build a broken config."""
    data = config.model_dump()
    data["model"].update(embedding_dim=int(params["embedding_dim"]), tower_dims=tower_dims(params))
    data["train"].update(
        {key: params[key] for key in ("learning_rate", "batch_size") if key in params}
    )
    if epochs is not None:
        data["train"]["epochs"] = epochs
    if monitor is not None:
        data["train"]["monitor"] = monitor
    return Config.model_validate(data)


def default_storage_url(config: Config) -> str:
    return f"sqlite:///{config.output_path / 'optuna.db'}"


def study_name_for(config: Config) -> str:
    return config.tune.study_name or config.name


def storage_url_for(config: Config) -> str:
    return config.tune.storage or default_storage_url(config)


def open_storage(url: str, tune: TuneSettings | None = None) -> optuna.storages.RDBStorage:
    """The study database, with pre-ping (PostgreSQL drops idle connections). A worker passes
    ``tune``: its trials then record heartbeats every ``tune.heartbeat_seconds``, so a killed
    worker's trial ends as FAIL (and is retried once) instead of RUNNING forever. SQLite waits
    for another local worker's write instead of failing with "database is locked"."""
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    sqlite_file = _sqlite_file(url)
    if sqlite_file is not None:
        sqlite_file.parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT_S}
    heartbeat: dict[str, Any] = {}  # none for readers: only a trial's worker beats
    with warnings.catch_warnings():  # the heartbeat is marked experimental
        warnings.simplefilter("ignore", ExperimentalWarning)
        if tune is not None:
            heartbeat = {
                "heartbeat_interval": tune.heartbeat_seconds,
                "grace_period": tune.grace_seconds,
                "heartbeat_stale_trial_callback": (
                    optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=STALE_TRIAL_RETRIES)
                ),
            }
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **heartbeat)


@contextlib.contextmanager
def storage_lock(url: str) -> Iterator[None]:
    """Held by one worker of the storage at a time, on any machine. It makes "does the study
    need another trial? then create it" atomic, so workers that ask at the same moment cannot
    overshoot ``tune.n_trials``. PostgreSQL: a transaction-level advisory lock on a connection
    of its own, released at commit, or by the server when a killed worker's connection drops.
    SQLite: an exclusive ``flock`` on ``<database>.lock``, released by the OS when the worker
    dies (local disks only). Other databases get no lock: run one worker per study there."""
    kind = _lock_kind(url)
    if kind == "postgresql":
        engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
        try:
            with engine.begin() as connection:
                connection.execute(
                    sqlalchemy.text("SELECT pg_advisory_xact_lock(:key)"),
                    {"key": ADVISORY_LOCK_KEY},
                )
                yield
        finally:
            engine.dispose()
    elif kind == "sqlite":
        import fcntl  # POSIX only, like the SQLite fallback itself: one machine

        lock_file = Path(f"{_sqlite_file(url)}.lock")
        lock_file.parent.mkdir(parents=True, exist_ok=True)
        with lock_file.open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
    else:
        yield


def _lock_kind(url: str) -> str | None:
    if sqlalchemy.engine.make_url(url).get_backend_name() == "postgresql":
        return "postgresql"
    return "sqlite" if _sqlite_file(url) is not None else None


def _sqlite_file(url: str) -> Path | None:
    """The database file of a SQLite URL; None for other databases and in-memory SQLite."""
    parsed = sqlalchemy.engine.make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def seeded_sampler(seed: int, trials_so_far: int) -> optuna.samplers.TPESampler:
    """TPE seeded from the config's seed and the study's length: reproducible, yet a resumed
    study does not replay the random draws its first run started with (TPE samples at random
    until it has 10 trials, so a plain ``seed`` would repeat trial 0's params after a rerun)."""
    return optuna.samplers.TPESampler(seed=seed * 1_000_003 + trials_so_far)


def make_pruner(tune: TuneSettings) -> optuna.pruners.BasePruner:
    if tune.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=MEDIAN_STARTUP_TRIALS)
    if tune.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=tune.epochs)
    return optuna.pruners.NopPruner()


def study_identity(config: Config, data_fingerprint: str) -> dict[str, Any]:
    """What a stored study must match to take more trials: the data, the search space and
    everything else that moves a trial's score (metric, epochs, seed, the unsearched model and
    training settings). JSON-normalised, as the storage keeps it."""
    space = config.tune.space
    searched = {name for name in ("learning_rate", "batch_size") if getattr(space, name)}
    identity = {
        "data_fingerprint": data_fingerprint,
        "search_space": space.model_dump(mode="json"),
        "metric": config.tune.metric,
        "epochs_per_trial": config.tune.epochs,
        "seed": config.seed,
        "model": config.model.model_dump(mode="json", exclude={"embedding_dim", "tower_dims"}),
        "train": config.train.model_dump(
            mode="json",
            exclude={"epochs", "monitor", "threads", "eval_batch_size", *searched},
        ),
    }
    return json.loads(json.dumps(identity))


def check_study_identity(study: optuna.Study, identity: dict[str, Any], storage: str) -> None:
    """Stamp a new study with ``identity``; refuse to extend one stamped with another."""
    stored = study.user_attrs
    if not any(key in stored for key in identity):
        if study.get_trials(deepcopy=False):
            raise StudyMismatch(
                f"study {study.study_name!r} at {storage} holds trials but was not made by "
                "`esmm tune`; set tune.study_name to a new name"
            )
        for key, value in identity.items():
            study.set_user_attr(key, value)
        return
    differs = [key for key in identity if stored.get(key) != identity[key]]
    if differs:
        details = "; ".join(
            f"{key}: study has {stored.get(key)!r}, this run {identity[key]!r}" for key in differs
        )
        raise StudyMismatch(
            f"study {study.study_name!r} at {storage} was made for other settings ({details}). "
            "Its trials are not comparable with this run's: set tune.study_name to a new name "
            "(or restore the settings to resume it)"
        )


def tune_stage(
    config: Config,
    prepared: PreparedData | None = None,
    *,
    observer: TrialObserver | None = None,
    progress: bool = True,
) -> TuneResult:
    """Stage `tune`: create or resume the study and run the trials it still misses to hold
    ``tune.n_trials`` finished (COMPLETE or PRUNED) ones, within ``tune.timeout_seconds``.

    This process is one worker (``tune_worker``); workers elsewhere may share the study, and
    together they finish exactly ``tune.n_trials``. Every trial trains with ``config.seed``
    (trials differ only by their parameters), without checkpoints, on train/val encoded once
    here; it reports the validation ``tune.metric`` after each epoch, and the pruner may stop
    it. A trial that diverges or raises is recorded FAIL and replaced, up to as many failures
    as trials this run needs. ``observer`` wraps each trial (see ``TrialObserver``). Writes
    plots and ``study_summary.csv`` to ``<output_dir>/tuning``. Raises ``StudyMismatch`` for a
    study made for other data or another search, ``TuningFailed`` when no trial completed."""
    result = tune_worker(config, prepared, observer=observer, progress=progress)
    return _write_outputs(config, result)


def tune_worker(
    config: Config,
    prepared: PreparedData | None = None,
    *,
    observer: TrialObserver | None = None,
    progress: bool = True,
) -> TuneResult:
    """`esmm tune-worker`: join the study at ``tune.storage`` and run trials until it holds
    ``tune.n_trials`` finished ones, together with every other worker of the study (on this
    machine or others). The study's summary comes back without plots (``outputs`` is None):
    with many workers, the one that started them writes them once."""
    _check_tunable(config)
    _quiet_optuna()
    if prepared is None:
        prepared = load_prepared(config)
    tune = config.tune
    fingerprint = prepared.manifest["fingerprint"]
    url = storage_url_for(config)
    study, storage = _join_study(config, fingerprint)
    finished, running = _finished_and_reserved(study)
    missing = tune.n_trials - finished
    trials_run = 0
    if missing > 0:
        encoder = prepared.encoder
        train = encoder.encode_split(prepared.tables["train"])
        val = encoder.encode_split(prepared.tables["val"])
        log.info(
            "study %r at %s: %d of %d trials finished, %d running elsewhere; %d more needed "
            "(%d train / %d val rows)",
            study.study_name,
            url,
            finished,
            tune.n_trials,
            running,
            missing,
            len(train),
            len(val),
        )
        objective = _Objective(config, encoder, train, val, fingerprint, observer, progress)
        # each failure is replaced, up to `missing` of them
        trials_run = _run_trials(study, storage, objective, max_trials=2 * missing)
    else:
        log.info(
            "study %r at %s already holds %d finished trials; nothing to run",
            study.study_name,
            url,
            finished,
        )
    return _summarise(study, url, tune.metric, trials_run)


def tune_with_workers(config: Config, workers: int) -> TuneResult:
    """`esmm tune --workers N`: N local processes of ``esmm tune-worker`` on this config share
    the study; their log lines are relayed with a ``[worker i]`` prefix. The study is joined
    here first, so a mismatch is reported once (not by every worker) and its tables exist
    before they start. Plots and the summary are written once, at the end. Raises
    ``TuningFailed`` when workers failed and the study is short of ``tune.n_trials``."""
    _check_tunable(config)
    _quiet_optuna()
    study, _ = _join_study(config, load_manifest(config)["fingerprint"])
    trials_before = len(study.get_trials(deepcopy=False))
    finished, running = _finished_and_reserved(study)
    exit_codes: list[int] = []
    if finished < config.tune.n_trials:
        log.info(
            "study %r at %s: %d of %d trials finished, %d running elsewhere; starting %d workers",
            study.study_name,
            storage_url_for(config),
            finished,
            config.tune.n_trials,
            running,
            workers,
        )
        with tempfile.TemporaryDirectory(prefix="esmm-tune-") as folder:
            config_file = Path(folder) / "config.yaml"
            config_file.write_text(dump_config(config))
            exit_codes = _run_worker_processes(config_file, workers)
        finished, _ = _finished_and_reserved(study)
    else:
        log.info(
            "study %r at %s already holds %d finished trials; no worker needed",
            study.study_name,
            storage_url_for(config),
            finished,
        )
    failures = [f"worker {i} exited with {code}" for i, code in enumerate(exit_codes) if code]
    if failures and finished < config.tune.n_trials:
        raise TuningFailed(
            f"{', '.join(failures)}; study {study.study_name!r} holds {finished} of "
            f"{config.tune.n_trials} finished trials (the workers' log lines above say why)"
        )
    for failure in failures:
        log.warning("%s; the other workers finished the study", failure)
    trials_run = len(study.get_trials(deepcopy=False)) - trials_before
    result = _summarise(study, storage_url_for(config), config.tune.metric, trials_run)
    return _write_outputs(config, result)


def _check_tunable(config: Config) -> None:
    if config.model.kind == "unbias":
        raise ConfigError(
            "tuning model.kind='unbias' is not supported: its rejection sampling needs a "
            "reference CTR network trained first; tune 'esmm' (the shipped model) instead"
        )


def _join_study(
    config: Config, data_fingerprint: str
) -> tuple[optuna.Study, optuna.storages.RDBStorage]:
    """Create or load the study, under the storage lock: workers starting together on a new
    database do not race to create its tables or stamp the study twice. Refuses a study made
    for other settings and fails the trials of stopped workers."""
    tune = config.tune
    url = storage_url_for(config)
    if _lock_kind(url) is None:
        log.warning(
            "tune.storage %s: no lock between workers on this database; run one worker per "
            "study (PostgreSQL or SQLite coordinate many)",
            url,
        )
    with storage_lock(url):
        storage = open_storage(url, tune)
        study = optuna.create_study(
            study_name=study_name_for(config),
            storage=storage,
            pruner=make_pruner(tune),
            direction="minimize" if tune.metric in LOWER_IS_BETTER else "maximize",
            load_if_exists=True,
        )
        check_study_identity(study, study_identity(config, data_fingerprint), url)
        _fail_stale_trials(study)
    return study, storage


def worker_id() -> str:
    """This worker's mark on the trials it runs (the ``worker`` user attribute)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _finished_and_reserved(study: optuna.Study) -> tuple[int, int]:
    """Finished trials, and RUNNING ones reserved by a live worker: marked with WORKER_ATTR
    (set after their first heartbeat) and not yet failed as stale. A trial whose worker died
    between creating it and marking it is not counted: nobody would ever finish it."""
    trials = study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING))
    finished = sum(trial.state in FINISHED for trial in trials)
    reserved = sum(
        trial.state == TrialState.RUNNING and WORKER_ATTR in trial.user_attrs for trial in trials
    )
    return finished, reserved


def _run_trials(
    study: optuna.Study,
    storage: optuna.storages.RDBStorage,
    objective: _Objective,
    *,
    max_trials: int,
) -> int:
    """The worker loop; returns the number of trials it ran. Under the storage lock: fail
    stale trials, count finished + reserved, and create the next trial only if that is below
    ``tune.n_trials``. When the missing trials all run elsewhere, wait: one may still fail
    (or its worker die) and need replacing. Stops at ``tune.n_trials`` finished, after
    ``max_trials`` of its own or at ``tune.timeout_seconds``."""
    config = objective.config
    tune = config.tune
    url = storage_url_for(config)
    study_id = storage.get_study_id_from_name(study.study_name)
    deadline = None if tune.timeout_seconds is None else time.monotonic() + tune.timeout_seconds
    trials_run = 0
    while trials_run < max_trials and (deadline is None or time.monotonic() < deadline):
        with storage_lock(url):
            _fail_stale_trials(study)
            finished, reserved = _finished_and_reserved(study)
            if finished >= tune.n_trials:
                break
            reservation = None
            if finished + reserved < tune.n_trials:
                reservation = _reserve_trial(study, storage, study_id, config)
        if reservation is None:
            time.sleep(min(tune.heartbeat_seconds, MAX_WAIT_POLL_S))
            continue
        trials_run += 1
        _run_trial(study, storage, *reservation, objective)
    return trials_run


def _reserve_trial(
    study: optuna.Study, storage: optuna.storages.RDBStorage, study_id: int, config: Config
) -> tuple[optuna.Trial, int]:
    """Create the next trial (a queued retry first), draw its parameters, record its first
    heartbeat and mark it with this worker, all before the storage lock is released. The
    sampler is seeded from the study's length, so concurrent workers draw different points
    and a resumed study does not replay its first draws."""
    study.sampler = seeded_sampler(config.seed, len(study.get_trials(deepcopy=False)))
    with warnings.catch_warnings():  # the heartbeat below is ours: no Study.optimize needed
        warnings.filterwarnings("ignore", message="Heartbeat of storage", category=UserWarning)
        trial = study.ask()
    suggest_params(trial, config.tune.space)
    trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
    storage.record_heartbeat(trial_id)
    trial.set_user_attr(WORKER_ATTR, worker_id())
    return trial, trial_id


def _run_trial(
    study: optuna.Study,
    storage: optuna.storages.RDBStorage,
    trial: optuna.Trial,
    trial_id: int,
    objective: _Objective,
) -> None:
    """Train the trial with its heartbeat running and tell the study how it ended. Ctrl-C
    records it FAIL and stops the worker. A trial that another worker already failed as stale
    (this worker's heartbeat fell silent for longer than the grace period) stays FAIL."""
    with _heartbeat(storage, trial_id, objective.config.tune.heartbeat_seconds):
        value, state = None, TrialState.COMPLETE
        try:
            value = objective.run(trial)
        except optuna.TrialPruned:
            state = TrialState.PRUNED
        except Exception:  # logged by the objective; the study goes on
            state = TrialState.FAIL
        except KeyboardInterrupt:
            study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
            raise
        told = study.tell(trial, value, state=state, skip_if_finished=True)
    if told.state != state:
        log.warning(
            "trial #%d had already been failed by another worker: its heartbeat was silent "
            "for over tune.grace_seconds=%d s; its result is not counted",
            trial.number,
            objective.config.tune.grace_seconds,
        )


@contextlib.contextmanager
def _heartbeat(storage: optuna.storages.RDBStorage, trial_id: int, seconds: int) -> Iterator[None]:
    """Record the trial's heartbeat every ``seconds`` while it trains. A worker that dies
    stops it; a database hiccup is logged and retried at the next beat."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(seconds):
            try:
                storage.record_heartbeat(trial_id)
            except Exception as error:  # the trial goes on; the next beat retries
                log.warning("heartbeat of trial id %d not recorded: %s", trial_id, error)

    thread = threading.Thread(target=beat, name=f"esmm-heartbeat-{trial_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _run_worker_processes(config_file: Path, workers: int) -> list[int]:
    """Start the worker processes, relay their output line by line and wait for them. If this
    process stops early, the workers still running are stopped too (see ``_stop_workers``)."""
    command = [sys.executable, "-m", "esmm.cli", "tune-worker", "-c", str(config_file), "-q"]
    processes = [
        subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        for _ in range(workers)
    ]
    relays = [
        threading.Thread(target=_relay, args=(process.stdout, f"[worker {i}] "), daemon=True)
        for i, process in enumerate(processes)
    ]
    for relay in relays:
        relay.start()
    try:
        for process in processes:
            process.wait()
    finally:
        _stop_workers(processes)
        for relay in relays:
            relay.join()
    return [process.returncode for process in processes]


def _stop_workers(processes: list[subprocess.Popen]) -> None:
    """Ctrl-C reaches the whole process group, so each worker first gets time to record its
    running trial FAIL on its own (a second SIGINT could interrupt that); a worker still
    running then gets SIGINT, and at last SIGKILL (its trial then fails by heartbeat)."""
    for stop in (None, signal.SIGINT, signal.SIGKILL):
        running = [process for process in processes if process.poll() is None]
        for process in running:
            if stop is not None:
                process.send_signal(stop)
        for process in running:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=WORKER_STOP_TIMEOUT_S)


_RELAY_LOCK = threading.Lock()


def _relay(stream: IO[str], prefix: str) -> None:
    for line in stream:
        with _RELAY_LOCK:
            sys.stderr.write(prefix + line)
            sys.stderr.flush()


def _write_outputs(config: Config, result: TuneResult) -> TuneResult:
    result.outputs = config.output_path / TUNING_FOLDER
    write_study_plots(result, result.outputs)
    log.info(
        "best trial #%d: %s %.4f  emb %d towers %s",
        result.best_trial_number,
        result.metric,
        result.best_value,
        result.best_params["embedding_dim"],
        tower_dims(result.best_params),
    )
    return result


class _Objective:
    """One trial's training: train with the trial's params, report every epoch, return the
    best epoch's validation metric; logs one line per trial with its outcome and an ETA."""

    def __init__(
        self,
        config: Config,
        encoder: FeatureEncoder,
        train: EncodedSplit,
        val: EncodedSplit,
        data_fingerprint: str,
        observer: TrialObserver | None,
        progress: bool,
    ) -> None:
        self.config = config
        self.encoder, self.train, self.val = encoder, train, val
        self.data_fingerprint = data_fingerprint
        self.observer = observer
        self.progress = progress
        self.monitor = monitor_for(config.model.kind, config.tune.metric)
        self.seconds: list[float] = []

    def run(self, trial: optuna.Trial) -> float:
        started = time.perf_counter()
        params = dict(trial.params)
        trial_config = config_for_params(
            self.config, params, epochs=self.config.tune.epochs, monitor=self.config.tune.metric
        )
        reported: list[float] = []

        def report_and_prune(epoch: EpochResult) -> None:
            value = epoch.val_metrics[self.monitor]
            reported.append(value)
            trial.report(value, step=epoch.epoch)
            if epoch.epoch < trial_config.train.epochs and trial.should_prune():
                raise optuna.TrialPruned(f"{self.monitor} {value:.4f} at epoch {epoch.epoch}")

        observing = (
            self.observer.trial(trial.number, params)
            if self.observer
            else contextlib.nullcontext(None)
        )
        try:
            with observing as observe:
                _, result = fit(
                    trial_config,
                    trial_config.model,
                    self.encoder,
                    self.train,
                    self.val,
                    seed=self.config.seed,
                    data_fingerprint=self.data_fingerprint,
                    checkpoint_dir=None,
                    progress=self.progress,
                    callbacks=[observe, report_and_prune] if observe else [report_and_prune],
                )
                if not math.isfinite(result.best_value):
                    raise ValueError(f"{self.monitor} was {result.best_value} in every epoch")
        except optuna.TrialPruned:
            self._log(trial, params, reported[-1], f"pruned at epoch {len(reported)}", started)
            raise
        except Exception as error:
            self._log(trial, params, None, f"FAILED: {type(error).__name__}: {error}", started)
            raise
        self._log(trial, params, result.best_value, "complete", started)
        return result.best_value

    def _log(
        self,
        trial: optuna.Trial,
        params: dict[str, Any],
        value: float | None,
        outcome: str,
        started: float,
    ) -> None:
        seconds = time.perf_counter() - started
        self.seconds.append(seconds)
        states = Counter(trial.state for trial in trial.study.get_trials(deepcopy=False))
        finished = sum(states[state] for state in FINISHED)
        finished += 0 if outcome.startswith("FAILED") else 1  # this trial is still RUNNING
        remaining = max(self.config.tune.n_trials - finished, 0)
        # the running trials (this one included) are the workers sharing what remains
        workers = max(states[TrialState.RUNNING], 1)
        eta = remaining * sum(self.seconds) / len(self.seconds) / workers
        searched = "".join(
            f" {label} {params[key]:{spec}}"
            for key, label, spec in (("learning_rate", "lr", ".2e"), ("batch_size", "batch", "d"))
            if key in params
        )
        log.info(
            "trial %d/%d  #%d  emb %d towers %s%s  %s  (%s)  %.0f s, ETA ~%.0f s",
            finished,
            self.config.tune.n_trials,
            trial.number,
            params["embedding_dim"],
            tower_dims(params),
            searched,
            f"{self.monitor} {value:.4f}" if value is not None else f"{self.monitor} -",
            outcome,
            seconds,
            eta,
        )


def _summarise(study: optuna.Study, storage: str, metric: str, trials_run: int) -> TuneResult:
    counts = Counter(trial.state for trial in study.get_trials(deepcopy=False))
    if not counts[TrialState.COMPLETE]:
        raise TuningFailed(
            f"no trial of study {study.study_name!r} at {storage} completed "
            f"({counts[TrialState.FAIL]} failed, {counts[TrialState.PRUNED]} pruned); "
            "the log lines above give each failure's reason"
        )
    best = study.best_trial
    return TuneResult(
        study_name=study.study_name,
        storage=storage,
        metric=metric,
        direction=study.direction.name.lower(),
        best_params=dict(best.params),
        best_value=float(best.value),
        best_trial_number=best.number,
        complete=counts[TrialState.COMPLETE],
        pruned=counts[TrialState.PRUNED],
        failed=counts[TrialState.FAIL],
        trials_run_now=trials_run,
    )


def write_study_plots(study_or_result: optuna.Study | TuneResult, folder: str | Path) -> list[Path]:
    """The optimisation history and parameter importances (PNG) and ``study_summary.csv`` of
    every trial, each written atomically into ``folder``. Importances need two completed
    trials; where they cannot be computed the plot is skipped (and a stale one removed) with
    the reason logged."""
    import matplotlib

    matplotlib.use("Agg")
    from optuna.visualization import matplotlib as optuna_plots

    study = study_or_result
    if isinstance(study_or_result, TuneResult):
        study = optuna.load_study(
            study_name=study_or_result.study_name, storage=open_storage(study_or_result.storage)
        )
    folder = Path(folder)
    written = [_write_summary(study, folder / SUMMARY_FILE)]
    with warnings.catch_warnings():  # optuna's matplotlib plots are marked experimental
        warnings.simplefilter("ignore", ExperimentalWarning)
        # A short study always has parameter values tried only once; said in the docs instead.
        warnings.filterwarnings("ignore", message="Some regimes", category=UserWarning)
        written.append(
            _save_plot(optuna_plots.plot_optimization_history(study), folder / HISTORY_PLOT)
        )
        complete = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
        reason = f"{complete} completed trial(s), 2 needed" if complete < 2 else ""
        if not reason:
            try:
                axes = optuna_plots.plot_param_importances(study)
            except (ValueError, RuntimeError, ImportError) as error:
                reason = f"{type(error).__name__}: {error}"
            else:
                written.append(_save_plot(axes, folder / IMPORTANCE_PLOT))
    if reason:
        (folder / IMPORTANCE_PLOT).unlink(missing_ok=True)
        log.info("parameter importances not plotted: %s", reason)
    return written


def _save_plot(axes: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    figure = axes.figure
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=110, format="png")
    plt.close(figure)
    return path


def _write_summary(study: optuna.Study, path: Path) -> Path:
    trials = study.get_trials(deepcopy=False)
    names = sorted({name for trial in trials for name in trial.params})
    with atomic_path(path) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["number", "state", "value", "duration_s", *names])
        for trial in trials:
            writer.writerow(
                [
                    trial.number,
                    trial.state.name,
                    "" if trial.value is None else trial.value,
                    "" if trial.duration is None else round(trial.duration.total_seconds(), 2),
                    *(trial.params.get(name, "") for name in names),
                ]
            )
    return path


def _fail_stale_trials(study: optuna.Study) -> None:
    """Fail (and queue a retry of) trials whose worker stopped sending heartbeats, before
    counting what is missing. Called under the storage lock, so no other worker creates or
    fails stale trials meanwhile; a trial that another worker tells FAIL at the same moment
    may be logged here as stale too."""
    running = {
        trial.number for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    }
    if not running:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    stale = sorted(
        trial.number
        for trial in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
        if trial.number in running
    )
    if stale:
        log.info(
            "trial(s) %s of a stopped worker marked FAIL (heartbeat silent for over "
            "tune.grace_seconds); each is retried once",
            ", ".join(f"#{number}" for number in stale),
        )


class _DropFailedTrialWarnings(logging.Filter):
    """Optuna logs a failed trial as a warning with a traceback; our own line replaces it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Trial ") or " failed " not in record.getMessage()


_FAILED_TRIAL_FILTER = _DropFailedTrialWarnings()


def _quiet_optuna() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("optuna.study._optimize").addFilter(_FAILED_TRIAL_FILTER)
