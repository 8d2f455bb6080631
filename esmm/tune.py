"""Stage `tune`: an Optuna search over the embedding size and the tower shape (and the learning
rate and batch size when the config asks), scored on the validation split.

The study lives in a database (``tune.storage``; SQLite under ``output_dir`` by default,
PostgreSQL for many workers) under a name (``tune.study_name``), so a rerun resumes it: it runs
only the trials still missing to reach ``tune.n_trials`` finished ones. A worker killed mid-trial
leaves its trial RUNNING; the storage heartbeat turns it into FAIL once it has been silent for
``GRACE_PERIOD_S`` and queues one retry with the same parameters. A study remembers the data
and the search it was made for, and a run with other data or another search is refused rather
than mixed into it.

The final model is trained by the pipeline from ``best_params`` with ``config_for_params``.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.trial import TrialState

from esmm.atomic import atomic_path
from esmm.config import Config, ConfigError, SearchSpace, TuneSettings
from esmm.data.encode import EncodedSplit, FeatureEncoder
from esmm.prepare import PreparedData, load_prepared
from esmm.train import LOWER_IS_BETTER, EpochResult, fit, monitor_for

log = logging.getLogger(__name__)

TUNING_FOLDER = "tuning"
SUMMARY_FILE = "study_summary.csv"
HISTORY_PLOT = "optimization_history.png"
IMPORTANCE_PLOT = "param_importances.png"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
# A running trial records a heartbeat every HEARTBEAT_INTERVAL_S; one silent for GRACE_PERIOD_S
# belonged to a killed worker: it becomes FAIL and is retried (once) with the same parameters.
HEARTBEAT_INTERVAL_S = 10
GRACE_PERIOD_S = 30
STALE_TRIAL_RETRIES = 1
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


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """The study database: pre-ping (PostgreSQL drops idle connections) and a heartbeat, so a
    killed worker's trial ends as FAIL (and is retried) instead of RUNNING forever."""
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # the heartbeat is marked experimental
        warnings.simplefilter("ignore", ExperimentalWarning)
        return optuna.storages.RDBStorage(
            url,
            engine_kwargs={"pool_pre_ping": True},
            heartbeat_interval=HEARTBEAT_INTERVAL_S,
            grace_period=GRACE_PERIOD_S,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                max_retry=STALE_TRIAL_RETRIES
            ),
        )


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

    Every trial trains with ``config.seed`` (trials differ only by their parameters), without
    checkpoints, on train/val encoded once here; it reports the validation ``tune.metric``
    after each epoch, and the pruner may stop it. A trial that diverges or raises is recorded
    FAIL and replaced, up to as many failures as trials this run needs. ``observer`` wraps each
    trial (see ``TrialObserver``). Writes plots and ``study_summary.csv`` to
    ``<output_dir>/tuning``. Raises ``StudyMismatch`` for a study made for other data or
    another search, ``TuningFailed`` when no trial completed."""
    if config.model.kind == "unbias":
        raise ConfigError(
            "tuning model.kind='unbias' is not supported: its rejection sampling needs a "
            "reference CTR network trained first; tune 'esmm' (the shipped model) instead"
        )
    _quiet_optuna()
    if prepared is None:
        prepared = load_prepared(config)
    tune = config.tune
    fingerprint = prepared.manifest["fingerprint"]
    study_name = tune.study_name or config.name
    storage = tune.storage or default_storage_url(config)
    direction = "minimize" if tune.metric in LOWER_IS_BETTER else "maximize"
    study = optuna.create_study(
        study_name=study_name,
        storage=open_storage(storage),
        pruner=make_pruner(tune),
        direction=direction,
        load_if_exists=True,
    )
    check_study_identity(study, study_identity(config, fingerprint), storage)
    study.sampler = seeded_sampler(config.seed, len(study.get_trials(deepcopy=False)))
    _fail_stale_trials(study)

    missing = tune.n_trials - len(study.get_trials(deepcopy=False, states=FINISHED))
    objective = None
    if missing > 0:
        encoder = prepared.encoder
        train = encoder.encode_split(prepared.tables["train"])
        val = encoder.encode_split(prepared.tables["val"])
        log.info(
            "study %r at %s: %d of %d trials finished; running %d more (%d train / %d val rows)",
            study_name,
            storage,
            tune.n_trials - missing,
            tune.n_trials,
            missing,
            len(train),
            len(val),
        )
        objective = _Objective(config, encoder, train, val, fingerprint, observer, progress)
        study.optimize(
            objective,
            n_trials=2 * missing,  # each failure is replaced, up to `missing` of them
            timeout=tune.timeout_seconds,
            catch=(Exception,),
            callbacks=[optuna.study.MaxTrialsCallback(tune.n_trials, states=FINISHED)],
        )
    else:
        log.info(
            "study %r at %s already holds %d finished trials; nothing to run",
            study_name,
            storage,
            tune.n_trials - missing,
        )
    result = _summarise(study, storage, tune.metric, objective.trials_run if objective else 0)
    result.outputs = config.output_path / TUNING_FOLDER
    write_study_plots(study, result.outputs)
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
    """One trial: draw params, train with them, report every epoch, return the best epoch's
    validation metric; logs one line per trial with its outcome and an ETA."""

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
        self.trials_run = 0
        self.seconds: list[float] = []

    def __call__(self, trial: optuna.Trial) -> float:
        started = time.perf_counter()
        self.trials_run += 1
        params = suggest_params(trial, self.config.tune.space)
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
        finished = len(trial.study.get_trials(deepcopy=False, states=FINISHED))
        finished += 0 if outcome.startswith("FAILED") else 1  # this trial is still RUNNING
        remaining = max(self.config.tune.n_trials - finished, 0)
        eta = remaining * sum(self.seconds) / len(self.seconds)
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
    counting what is missing; Optuna does the same before each trial it starts."""
    running = len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
    if not running:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    stale = running - len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
    if stale:
        log.info("%d trial(s) of a stopped worker marked FAIL; each is retried once", stale)


class _DropFailedTrialWarnings(logging.Filter):
    """Optuna logs a failed trial as a warning with a traceback; our own line replaces it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Trial ") or " failed " not in record.getMessage()


_FAILED_TRIAL_FILTER = _DropFailedTrialWarnings()


def _quiet_optuna() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("optuna.study._optimize").addFilter(_FAILED_TRIAL_FILTER)
