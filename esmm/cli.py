"""The `esmm` command line: one verb per pipeline stage, plus `run` for all of them in order.

Heavy libraries are imported inside the verbs, so `esmm --help` answers at once.
"""

from __future__ import annotations

import logging
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Literal

import typer

app = typer.Typer(
    help="ESMM (Entire Space Multi-Task Model) for post-click conversion-rate estimation.\n\n"
    "Stages, in order: simulate -> validate -> prepare -> tune -> train -> evaluate -> register "
    "-> promote (rollback, predict). `run` does simulate -> prepare -> train -> evaluate without "
    "tracking; the tracked pipeline is the Prefect flow: python -m flows.pipeline.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
log = logging.getLogger("esmm")

ConfigOption = Annotated[
    Path, typer.Option("--config", "-c", help="YAML config (see conf/).", show_default=True)
]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a config key: --set train.epochs=3 (repeatable)."),
]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
DEFAULT_CONFIG = Path("conf/default.yaml")


@contextmanager
def _clear_errors():
    """Known failures (bad config, bad data, divergence, missing inputs) print one clear
    message and exit non-zero, instead of a traceback."""
    from esmm.config import ConfigError
    from esmm.data.table import DataError
    from esmm.progress import STDERR
    from esmm.registry import RegistryError
    from esmm.train import CheckpointMismatch, TrainingDiverged

    try:
        yield
    except ConfigError as error:
        STDERR.print(
            f"[bold red]config error:[/] {error}", markup=True, highlight=False, soft_wrap=True
        )
        raise typer.Exit(2) from None
    except (
        DataError,
        TrainingDiverged,
        CheckpointMismatch,
        FileNotFoundError,
        RegistryError,
    ) as error:
        kind = type(error).__name__
        STDERR.print(f"[bold red]{kind}:[/] {error}", markup=True, highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None


def _load(config: Path, overrides: list[str] | None):
    from esmm.config import load_config

    return load_config(config, overrides or [])


@app.callback()
def _main() -> None:
    from esmm.progress import setup_logging

    setup_logging()


@app.command()
def simulate(
    config: ConfigOption = DEFAULT_CONFIG,
    overrides: SetOption = None,
    rows: Annotated[int | None, typer.Option(help="Impressions (data.simulator.rows).")] = None,
    days: Annotated[int | None, typer.Option(help="Days (data.simulator.days).")] = None,
    preset: Annotated[
        str | None, typer.Option(help="Simulator preset: default or ali-ccp.")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Simulator seed.")] = None,
    output: Annotated[Path | None, typer.Option(help="Parquet file to write (data.path).")] = None,
    append_day: Annotated[
        bool,
        typer.Option(
            "--append-day", help="Append the next day to the existing table (a new partition)."
        ),
    ] = False,
    quiet: QuietOption = False,
) -> None:
    """Write a simulated impression table (Parquet) with known true pCTR and pCVR."""
    with _clear_errors():
        extra = [
            f"data.simulator.{key}={value}"
            for key, value in (("rows", rows), ("days", days), ("preset", preset), ("seed", seed))
            if value is not None
        ]
        if output is not None:
            extra.append(f"data.path={output}")
        cfg = _load(config, [*(overrides or []), *extra])
        if append_day:
            from esmm.data.sources import append_simulated_day

            path, day, added = append_simulated_day(cfg)
            log.info("appended day %d (%d impressions) to %s", day, added, path)
            return
        _simulate_table(cfg, quiet)


def _simulate_table(cfg, quiet: bool) -> None:
    """Write the configured simulated table and log its size and speed."""
    from esmm.data.sources import simulate_to_file

    started = time.perf_counter()
    path, table = simulate_to_file(cfg, progress=not quiet)
    seconds = time.perf_counter() - started
    log.info(
        "simulated %d impressions over %d days in %.1f s (%.0f rows/s) -> %s",
        table.num_rows,
        cfg.data.simulator.days,
        seconds,
        table.num_rows / seconds,
        path,
    )


@app.command()
def validate(config: ConfigOption = DEFAULT_CONFIG, overrides: SetOption = None) -> None:
    """Check the source data with the Great Expectations suite (exit 1 if it fails); the
    report lands in <output_dir>/validation/."""
    with _clear_errors():
        from esmm.progress import STDOUT
        from esmm.validate import DataValidationFailed, summary_table, validate_stage

        cfg = _load(config, overrides)
        try:
            report = validate_stage(cfg)
        except DataValidationFailed as failure:
            STDOUT.print(summary_table(failure.report))
            raise
        STDOUT.print(summary_table(report))
        log.info("data validation passed; report written to %s", report.folder)


@app.command()
def prepare(config: ConfigOption = DEFAULT_CONFIG, overrides: SetOption = None) -> None:
    """Load and check the data, split it by time, fit the encoders on the training split."""
    with _clear_errors():
        from esmm.prepare import prepare as prepare_stage
        from esmm.prepare import prepared_path

        cfg = _load(config, overrides)
        prepare_stage(cfg)
        log.info("prepared data written to %s", prepared_path(cfg))


@app.command()
def train(
    config: ConfigOption = DEFAULT_CONFIG,
    overrides: SetOption = None,
    resume: Annotated[
        bool, typer.Option(help="Continue from the last epoch checkpoint of this output_dir.")
    ] = False,
    quiet: QuietOption = False,
) -> None:
    """Train the configured model on the prepared data (checkpoint every epoch)."""
    with _clear_errors():
        from esmm.train import train_stage

        cfg = _load(config, overrides)
        _, result = train_stage(cfg, resume=resume, progress=not quiet)
        log.info(
            "best epoch %d: validation %s = %.4f; model saved to %s",
            result.best_epoch,
            result.monitor,
            result.best_value,
            cfg.output_path / "model",
        )


@app.command()
def evaluate(config: ConfigOption = DEFAULT_CONFIG, overrides: SetOption = None) -> None:
    """Score the trained model on the test split and print the metrics table."""
    with _clear_errors():
        from esmm.evaluate import evaluate_stage, metrics_table
        from esmm.progress import STDOUT

        cfg = _load(config, overrides)
        metrics = evaluate_stage(cfg)
        STDOUT.print(metrics_table(metrics, f"Test metrics ({cfg.name}, {cfg.model.kind})"))
        log.info("metrics written to %s", cfg.output_path / "metrics.json")


@app.command()
def tune(
    config: ConfigOption = DEFAULT_CONFIG,
    overrides: SetOption = None,
    trials: Annotated[
        int | None, typer.Option(help="Finished trials the study should hold (tune.n_trials).")
    ] = None,
    workers: Annotated[
        int,
        typer.Option(
            min=1, help="Local worker processes sharing the study (1: tune in this process)."
        ),
    ] = 1,
    quiet: QuietOption = False,
) -> None:
    """Search embedding size and tower shape (learning rate, batch size if configured) with
    Optuna on the prepared data; rerunning resumes the study."""
    with _clear_errors():
        extra = [f"tune.n_trials={trials}"] if trials is not None else []
        cfg = _load(config, [*(overrides or []), *extra])
        from rich.table import Table

        from esmm.progress import STDERR, STDOUT
        from esmm.tune import (
            StudyMismatch,
            TuningFailed,
            tower_dims,
            tune_stage,
            tune_with_workers,
        )

        try:
            if workers > 1:
                result = tune_with_workers(cfg, workers)
            else:
                result = tune_stage(cfg, progress=not quiet)
        except (StudyMismatch, TuningFailed) as error:
            kind = type(error).__name__
            STDERR.print(
                f"[bold red]{kind}:[/] {error}", markup=True, highlight=False, soft_wrap=True
            )
            raise typer.Exit(1) from None
        table = Table(
            title=f"Best of study {result.study_name!r}: trial #{result.best_trial_number}"
        )
        table.add_column("parameter")
        table.add_column("value", justify="right")
        for name, value in result.best_params.items():
            table.add_row(name, f"{value:.3g}" if isinstance(value, float) else str(value))
        table.add_row("tower_dims", str(tower_dims(result.best_params)))
        table.add_row(
            f"validation {result.metric} ({result.direction})", f"{result.best_value:.4f}"
        )
        STDOUT.print(table)
        log.info(
            "study %r at %s: %d complete, %d pruned, %d failed (%d run now); plots in %s",
            result.study_name,
            result.storage,
            result.complete,
            result.pruned,
            result.failed,
            result.trials_run_now,
            result.outputs,
        )


@app.command("tune-worker")
def tune_worker_command(
    config: ConfigOption = DEFAULT_CONFIG,
    overrides: SetOption = None,
    trials: Annotated[
        int | None, typer.Option(help="Finished trials the study should hold (tune.n_trials).")
    ] = None,
    quiet: QuietOption = False,
) -> None:
    """Join the study at tune.storage and run trials until it holds tune.n_trials finished
    ones; start one per machine or core on a shared PostgreSQL storage (docs/TUNING.md)."""
    with _clear_errors():
        extra = [f"tune.n_trials={trials}"] if trials is not None else []
        cfg = _load(config, [*(overrides or []), *extra])
        from esmm.progress import STDERR
        from esmm.tune import StudyMismatch, TuningFailed, tune_worker, worker_id

        try:
            result = tune_worker(cfg, progress=not quiet)
        except (StudyMismatch, TuningFailed) as error:
            kind = type(error).__name__
            STDERR.print(
                f"[bold red]{kind}:[/] {error}", markup=True, highlight=False, soft_wrap=True
            )
            raise typer.Exit(1) from None
        log.info(
            "worker %s ran %d trial(s); study %r at %s: %d complete, %d pruned, %d failed",
            worker_id(),
            result.trials_run_now,
            result.study_name,
            result.storage,
            result.complete,
            result.pruned,
            result.failed,
        )


@app.command()
def compare(
    config: ConfigOption = DEFAULT_CONFIG,
    overrides: SetOption = None,
    seeds: Annotated[int | None, typer.Option(help="Seeds 0..N-1 (compare.seeds).")] = None,
    search: Annotated[
        bool | None,
        typer.Option(help="Search AMAN's rate and OVERSAMPLING's factor (the paper's grids)."),
    ] = None,
    output: Annotated[
        Path | None, typer.Option(help="Results folder (compare.output_dir).")
    ] = None,
    update_doc: Annotated[
        str | None,
        typer.Option(
            help="Write results.md into DOC.md's 'results:SECTION' block: DOC.md:SECTION."
        ),
    ] = None,
    quiet: QuietOption = False,
) -> None:
    """The paper's comparison: every model over several seeds on one time split; writes
    results.csv/.md, runs.csv and plots."""
    with _clear_errors():
        extra, flags = [], []
        if seeds is not None:
            extra.append(f"compare.seeds={list(range(seeds))}")
            flags.append(f"--seeds {seeds}")
        if search is not None:
            extra.append(f"compare.search={str(search).lower()}")
            flags.append("--search" if search else "--no-search")
        if output is not None:
            extra.append(f"compare.output_dir={output}")
            flags.append(f"--output {output}")
        command = " ".join(
            ["esmm compare -c", str(config), *(f"--set '{o}'" for o in overrides or []), *flags]
        )
        overrides = [*(overrides or []), *extra]
        cfg = _load(config, overrides)
        from esmm.compare import compare_stage, results_markdown, update_document
        from esmm.progress import STDOUT

        if cfg.data.source == "simulator":
            _simulate_table(cfg, quiet)
        prepare(config=config, overrides=overrides)
        folder = Path(cfg.compare.output_dir or cfg.output_path / "compare")
        comparison = compare_stage(cfg, cfg.compare, folder)
        markdown = results_markdown(comparison)
        STDOUT.print(markdown, markup=False, highlight=False, soft_wrap=True)
        log.info("results written to %s", folder)
        if update_doc:
            document, _, section = update_doc.rpartition(":")
            update_document(Path(document), section, markdown, command)
            log.info("updated the 'results:%s' block of %s", section, document)


@app.command()
def run(
    config: ConfigOption = DEFAULT_CONFIG,
    overrides: SetOption = None,
    quiet: QuietOption = False,
) -> None:
    """The main job: simulate (for the simulator source) -> prepare -> train -> evaluate."""
    with _clear_errors():
        cfg = _load(config, overrides)
        started = time.perf_counter()
        if cfg.data.source == "simulator":
            _simulate_table(cfg, quiet)
        prepare(config=config, overrides=overrides)
        train(config=config, overrides=overrides, resume=False, quiet=quiet)
        evaluate(config=config, overrides=overrides)
        log.info("done in %.0f s", time.perf_counter() - started)


@app.command()
def register(config: ConfigOption = DEFAULT_CONFIG, overrides: SetOption = None) -> None:
    """Log the trained model (output_dir/model) to MLflow as a pyfunc model and register a new
    version with its test metrics (run `esmm evaluate` first)."""
    with _clear_errors():
        import json

        from esmm.evaluate import METRICS_FILE
        from esmm.prepare import load_prepared_split
        from esmm.registry import register_version
        from esmm.tracking import Tracker

        cfg = _load(config, overrides)
        metrics_path = cfg.output_path / METRICS_FILE
        if not metrics_path.exists():
            raise FileNotFoundError(f"{metrics_path}: no test metrics; run `esmm evaluate` first")
        metrics = json.loads(metrics_path.read_text())["metrics"]
        tracker = Tracker.start(cfg, run_name=f"{cfg.name}-register")
        try:
            tracker.set_tags({"esmm.stage": "register"})
            tracker.log_metrics(metrics, prefix="test_")
            example = load_prepared_split(cfg, "test").slice(0, 100)
            model_uri = tracker.log_model(cfg.output_path / "model", example)
            name = cfg.tracking.registered_model
            version = register_version(tracker.client, model_uri, name, tracker.run_id, metrics)
        except BaseException:
            tracker.finish("FAILED")
            raise
        tracker.finish()
        log.info("registered %s version %s (run %s)", name, version, tracker.run_id)


@app.command()
def promote(
    config: ConfigOption = DEFAULT_CONFIG,
    overrides: SetOption = None,
    version: Annotated[
        str | None, typer.Option(help="Version to promote (default: the latest).")
    ] = None,
    force: Annotated[
        bool,
        typer.Option(help="Promote even if not better (guardrails still apply); recorded."),
    ] = False,
) -> None:
    """Score a registered version and the @champion on the current test split; the version
    becomes @champion if better by promote.min_improvement, else @challenger."""
    with _clear_errors():
        from esmm.prepare import load_prepared_split
        from esmm.registry import latest_version, promote_version
        from esmm.tracking import connect, tracking_uri

        cfg = _load(config, overrides)
        client, _ = connect(cfg.tracking)
        name = cfg.tracking.registered_model
        version = version or latest_version(client, name)
        test_table = load_prepared_split(cfg, "test")
        decision = promote_version(
            client, tracking_uri(cfg.tracking), name, version, test_table, cfg.promote, force=force
        )
        from esmm.progress import STDOUT

        STDOUT.print(decision.markdown(), markup=False, highlight=False)
        if not decision.promoted:
            raise typer.Exit(3)


@app.command()
def rollback(config: ConfigOption = DEFAULT_CONFIG, overrides: SetOption = None) -> None:
    """Move @champion back to the @previous version (the one it replaced)."""
    with _clear_errors():
        from esmm.registry import rollback as rollback_champion
        from esmm.tracking import connect, tracking_uri

        cfg = _load(config, overrides)
        client, _ = connect(cfg.tracking)
        name = cfg.tracking.registered_model
        demoted, restored = rollback_champion(client, tracking_uri(cfg.tracking), name)
        log.info("%s: @champion is version %s again (was %s)", name, restored, demoted)


@app.command()
def predict(
    model: Annotated[
        str, typer.Option(help="Model URI, e.g. models:/esmm-cvr@champion or runs:/<id>/model.")
    ],
    input: Annotated[Path, typer.Option("--input", help="Parquet or CSV of raw feature rows.")],
    output: Annotated[Path, typer.Option(help="Parquet file to write pctr, pcvr, pctcvr to.")],
    keep: Annotated[
        list[str] | None, typer.Option(help="Input columns to copy to the output (repeatable).")
    ] = None,
    tracking_uri: Annotated[
        str | None,
        typer.Option(help="MLflow store (default: tracking.tracking_uri of conf/default.yaml)."),
    ] = None,
    precision: Annotated[
        Literal["float32", "bfloat16"],
        typer.Option(
            help="bfloat16: faster scoring on CPUs with AVX512-BF16, pCVR within about 1e-3 "
            "(float32 elsewhere, with a note)."
        ),
    ] = "float32",
) -> None:
    """Batch scoring: every input row gets pctr, pcvr and pctcvr, in the input's order."""
    with _clear_errors():
        import mlflow

        from esmm.config import TrackingSettings
        from esmm.serving import predict_file
        from esmm.tracking import tracking_uri as default_uri

        uri = tracking_uri or default_uri(TrackingSettings())
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        rows = predict_file(model, input, output, list(keep or []), precision)
        log.info("wrote %d scored rows to %s", rows, output)


@app.command()
def serve(
    model: Annotated[str, typer.Option(help="Model URI, e.g. models:/esmm-cvr@champion.")],
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 5001,
    host: Annotated[
        str,
        typer.Option(
            help="Interface to bind. The server has no authentication: bind another interface "
            "than 127.0.0.1 only behind a gateway that has."
        ),
    ] = "127.0.0.1",
    tracking_uri: Annotated[
        str | None,
        typer.Option(help="MLflow store (default: tracking.tracking_uri of conf/default.yaml)."),
    ] = None,
) -> None:
    """REST scoring with MLflow's scoring server: POST raw feature rows to /invocations, get
    pctr, pcvr and pctcvr back. Ctrl-C stops it."""
    with _clear_errors():
        import subprocess

        import mlflow

        from esmm.config import TrackingSettings
        from esmm.serving import curl_example, serve_command, serve_environment, serving_example
        from esmm.tracking import redact
        from esmm.tracking import tracking_uri as default_uri

        uri = tracking_uri or default_uri(TrackingSettings())
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        example = serving_example(model)  # also fails clearly on a URI that does not resolve
        url = f"http://{host}:{port}"
        typer.echo(f"serving {model} from {redact(uri)} at {url}; once it is up, try:")
        typer.echo(curl_example(url, example))
        try:
            result = subprocess.run(serve_command(model, port, host), env=serve_environment(uri))
        except KeyboardInterrupt:  # Ctrl-C reached the server too, which shuts down on it
            return
        if result.returncode:
            raise typer.Exit(result.returncode)


stack_app = typer.Typer(
    help="The team set-up without Docker: MLflow and Prefect servers on PostgreSQL as local "
    "processes (docker/compose.yaml runs the same topology in containers).",
    no_args_is_help=True,
)
app.add_typer(stack_app, name="stack")
StackFolderOption = Annotated[
    Path, typer.Option("--folder", help="State, logs, artifacts and Prefect's home.")
]


@contextmanager
def _stack_errors():
    """A stack that cannot start or whose state is unknown: one message, exit 1."""
    from esmm.stack import StackError

    try:
        yield
    except StackError as error:
        typer.echo(f"stack error: {error}", err=True)
        raise typer.Exit(1) from None


@stack_app.command("up")
def stack_up(
    folder: StackFolderOption = Path("runs/stack"),
    postgres_url: Annotated[
        str,
        typer.Option(help="PostgreSQL server (any database on it); a password goes to PGPASSWORD."),
    ] = "postgresql://postgres@127.0.0.1:5432/postgres",
    host: Annotated[str, typer.Option(help="Address the servers bind to.")] = "127.0.0.1",
    mlflow_port: Annotated[int, typer.Option(help="MLflow port (0: a free one).")] = 5000,
    prefect_port: Annotated[int, typer.Option(help="Prefect port (0: a free one).")] = 4200,
    database_prefix: Annotated[
        str, typer.Option(help="Databases <prefix>_mlflow, <prefix>_prefect, <prefix>_optuna.")
    ] = "esmm",
    timeout: Annotated[float, typer.Option(help="Seconds to wait for health.")] = 180.0,
) -> None:
    """Create the databases if missing, start the MLflow and Prefect servers in the
    background, wait until healthy and print the settings clients need."""
    from esmm.stack import StackSettings, start_stack

    with _stack_errors():
        stack = start_stack(
            StackSettings(
                folder=folder,
                postgres_url=postgres_url,
                host=host,
                mlflow_port=mlflow_port,
                prefect_port=prefect_port,
                database_prefix=database_prefix,
                start_timeout=timeout,
            )
        )
    for process in stack.processes:
        typer.echo(
            f"{process.name}: {process.url} (pid {process.pid}, healthy after "
            f"{process.ready_seconds} s, log {process.log})"
        )
    created = (
        f" (created now: {', '.join(stack.created_databases)})" if stack.created_databases else ""
    )
    typer.echo(f"databases: {', '.join(stack.databases)}{created}\n\n{stack.usage()}")


@stack_app.command("down")
def stack_down(
    folder: StackFolderOption = Path("runs/stack"),
    timeout: Annotated[float, typer.Option(help="Seconds before SIGTERM becomes SIGKILL.")] = 30.0,
) -> None:
    """Stop the servers recorded in the folder's stack.json (each process group)."""
    from esmm.stack import stop_stack

    with _stack_errors():
        outcome = stop_stack(folder, timeout)
    if outcome is None:
        typer.echo(f"no stack recorded in {folder}: nothing to stop")
        return
    for name, what in outcome.items():
        typer.echo(f"{name}: {what}")


@stack_app.command("status")
def stack_status(folder: StackFolderOption = Path("runs/stack")) -> None:
    """Whether each recorded server runs and answers its health check (exit 1 if not)."""
    from esmm.stack import stack_status as read_status

    with _stack_errors():
        stack, statuses = read_status(folder)
    for status in statuses:
        state = "healthy" if status.healthy else "running, not healthy"
        if not status.running:
            state = f"not running (see {status.log})"
        typer.echo(f"{status.name}: {state}  {status.url}  pid {status.pid}")
    if not all(status.healthy for status in statuses):
        raise typer.Exit(1)
    typer.echo(f"\n{stack.usage()}")


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
