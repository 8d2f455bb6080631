"""The `esmm` command line: one verb per pipeline stage, plus `run` for all of them in order.

Heavy libraries are imported inside the verbs, so `esmm --help` answers at once.
"""

from __future__ import annotations

import logging
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    help="ESMM (Entire Space Multi-Task Model) for post-click conversion-rate estimation.\n\n"
    "Stages, in order: simulate -> prepare -> train -> evaluate; `run` does all four.",
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


def _setup_logging() -> None:
    from rich.logging import RichHandler

    from esmm.progress import STDERR

    logging.basicConfig(
        level=logging.INFO,
        format="%(message)s",
        datefmt="%H:%M:%S",
        handlers=[RichHandler(console=STDERR, show_path=False, markup=False)],
        force=True,
    )


@contextmanager
def _clear_errors():
    """Known failures (bad config, bad data, divergence, missing inputs) print one clear
    message and exit non-zero, instead of a traceback."""
    from esmm.config import ConfigError
    from esmm.data.table import DataError
    from esmm.progress import STDERR
    from esmm.train import CheckpointMismatch, TrainingDiverged

    try:
        yield
    except ConfigError as error:
        STDERR.print(
            f"[bold red]config error:[/] {error}", markup=True, highlight=False, soft_wrap=True
        )
        raise typer.Exit(2) from None
    except (DataError, TrainingDiverged, CheckpointMismatch, FileNotFoundError) as error:
        kind = type(error).__name__
        STDERR.print(f"[bold red]{kind}:[/] {error}", markup=True, highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None


def _load(config: Path, overrides: list[str] | None):
    from esmm.config import load_config

    return load_config(config, overrides or [])


@app.callback()
def _main() -> None:
    _setup_logging()


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
        from esmm.data.simulate import simulate_impressions
        from esmm.data.sources import simulated_table_path
        from esmm.data.table import write_parquet_atomic

        settings = cfg.data.simulator
        started = time.perf_counter()
        table = simulate_impressions(
            settings.rows,
            preset=settings.preset,
            n_days=settings.days,
            seed=settings.seed,
            progress=not quiet,
        )
        seconds = time.perf_counter() - started
        path = write_parquet_atomic(table, simulated_table_path(cfg), settings.model_dump())
        log.info(
            "simulated %d impressions over %d days in %.1f s (%.0f rows/s) -> %s",
            table.num_rows,
            settings.days,
            seconds,
            table.num_rows / seconds,
            path,
        )


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
            simulate(
                config=config,
                overrides=overrides,
                rows=None,
                days=None,
                preset=None,
                seed=None,
                output=None,
                quiet=quiet,
            )
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
            simulate(
                config=config,
                overrides=overrides,
                rows=None,
                days=None,
                preset=None,
                seed=None,
                output=None,
                quiet=quiet,
            )
        prepare(config=config, overrides=overrides)
        train(config=config, overrides=overrides, resume=False, quiet=quiet)
        evaluate(config=config, overrides=overrides)
        log.info("done in %.0f s", time.perf_counter() - started)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
