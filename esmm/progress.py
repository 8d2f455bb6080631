"""The consoles: progress bars and log output share one stderr console, so bars and log lines
never tangle, and stdout is kept for tables and results."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TextColumn, TimeRemainingColumn
from rich.text import Text

PIPE_WIDTH = 140  # logs and tables piped to a file or CI log are not cut at 80 columns


def make_console(stderr: bool) -> Console:
    console = Console(stderr=stderr)
    return console if console.is_terminal else Console(stderr=stderr, width=PIPE_WIDTH)


STDERR = make_console(stderr=True)
STDOUT = make_console(stderr=False)


class RateColumn(ProgressColumn):
    """Throughput in the bar's own unit (samples/s, rows/s, lines/s)."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        return Text(f"{task.speed:,.0f} {self.unit}/s" if task.speed else "")


def progress_bar(unit: str, *, enabled: bool = True) -> Progress:
    """A transient bar: description, bar, done/total, rate and time remaining. Shown only on
    a terminal: in CI logs and pipes the per-stage log lines carry the throughput instead."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:,}/{task.total:,} " + unit),
        RateColumn(unit),
        TimeRemainingColumn(),
        console=STDERR,
        disable=not (enabled and STDERR.is_terminal),
        transient=True,
    )


def setup_logging() -> None:
    """Log lines (time, level, message) through the shared stderr console. Prefect's task and
    flow run records are prefixed with the run's name; chatty libraries only warn."""
    import logging

    from rich.logging import RichHandler

    class RunNameFormatter(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            message = super().format(record)
            run_name = getattr(record, "task_run_name", None) or getattr(
                record, "flow_run_name", None
            )
            return f"{run_name}: {message}" if run_name else message

    handler = RichHandler(console=STDERR, show_path=False, markup=False)
    handler.setFormatter(RunNameFormatter("%(message)s"))
    logging.basicConfig(level=logging.INFO, datefmt="%H:%M:%S", handlers=[handler], force=True)
    for chatty in ("httpx", "mlflow", "great_expectations", "alembic"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
