"""The team set-up's topology, described once: PostgreSQL, the MLflow tracking server, the
Prefect server, the worker that serves the scheduled deployment and optional tuning workers.

The same description starts the servers as local processes (``esmm stack up``, no Docker
needed) and is what ``tests/test_docker.py`` checks ``docker/compose.yaml`` against, so the two
cannot drift. Commands and environments are templates filled with the addresses of either
world: :func:`process_values` (loopback ports, folders under the state folder) or
:data:`COMPOSE_VALUES` (service names, container ports, volume mounts).

Local processes: each server runs in its own process group with its log in
``<folder>/logs/``; ``<folder>/stack.json`` records pids, ports and URLs so ``esmm stack down``
(SIGTERM to each group, SIGKILL after a timeout) and ``esmm stack status`` work from any
shell. PostgreSQL itself is not started: ``up`` creates the stores' databases on the server
named by ``--postgres-url`` if they are missing (each store keeps its own alembic_version
table, so each gets its own database). Passwords never go into URLs, commands, logs or the
state file: a password in ``--postgres-url`` is handed to the servers as PGPASSWORD, which
libpq (psycopg2) and asyncpg both read.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from esmm.atomic import atomic_path

STATE_FILE = "stack.json"
DEFAULT_FOLDER = Path("runs/stack")
DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
START_TIMEOUT_SECONDS = 180.0  # ~11 s each when the cores are free; shared CI cores are slower
STOP_TIMEOUT_SECONDS = 30.0
LOG_TAIL_LINES = 30
DEFAULT_CONFIG = "conf/default.yaml"


@dataclass(frozen=True)
class Store:
    """A PostgreSQL database one server or library keeps its tables in."""

    name: str  # mlflow, prefect, optuna
    driver: str  # the SQLAlchemy driver its client uses

    def database(self, prefix: str) -> str:
        return f"{prefix}_{self.name}"


STORES = (
    Store("mlflow", "postgresql+psycopg2"),  # MLflow's backend and registry store
    Store("prefect", "postgresql+asyncpg"),  # the Prefect server's database
    Store("optuna", "postgresql+psycopg2"),  # tune.storage: the Optuna studies
)


@dataclass(frozen=True)
class Service:
    """One service of the topology. ``command`` and ``environment`` are templates whose
    ``{placeholders}`` are filled from :func:`process_values` or :data:`COMPOSE_VALUES`."""

    name: str
    command: tuple[str, ...]
    environment: dict[str, str] = field(default_factory=dict)
    port: int | None = None  # the port it listens on (in its container; default locally)
    health_path: str | None = None  # HTTP path that answers 200 once it is ready
    published: bool = False  # a UI: published on the host (127.0.0.1 by default)
    volume: str | None = None  # named volume (compose) / folder under the state folder
    mount: str | None = None  # where the volume is mounted in the container
    stores: tuple[str, ...] = ()  # databases it uses
    profile: str | None = None  # compose profile: started only when asked for
    local: bool = False  # `esmm stack up` starts it as a process


SERVICES = (
    Service(
        name="postgres",
        command=("postgres",),
        port=5432,
        volume="postgres-data",
        mount="/var/lib/postgresql/data",
        stores=tuple(store.name for store in STORES),
    ),
    Service(
        name="mlflow",
        command=(
            "mlflow",
            "server",
            "--backend-store-uri",
            "{mlflow_store}",
            "--serve-artifacts",
            "--artifacts-destination",
            "{mlflow_artifacts}",
            "--host",
            "{bind_host}",
            "--port",
            "{mlflow_port}",
            "--workers",
            "1",
            "--allowed-hosts",
            "{mlflow_allowed_hosts}",
        ),
        # Without the job runner `mlflow server` is 2 processes instead of ~9.
        environment={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        port=5000,
        health_path="/health",
        published=True,
        volume="mlflow-artifacts",
        mount="/data/mlflow-artifacts",
        stores=("mlflow",),
        local=True,
    ),
    Service(
        name="prefect-server",
        command=("prefect", "server", "start", "--host", "{bind_host}", "--port", "{prefect_port}"),
        environment={"PREFECT_API_DATABASE_CONNECTION_URL": "{prefect_store}"},
        port=4200,
        health_path="/api/health",
        published=True,
        stores=("prefect",),
        local=True,
    ),
    Service(
        name="prefect-worker",
        command=(
            "python",
            "-m",
            "flows.deploy",
            "--config",
            DEFAULT_CONFIG,
            "--set",
            "tracking.tracking_uri={mlflow_url}",
            "--set",
            "tune.storage={optuna_store}",
        ),
        environment={"PREFECT_API_URL": "{prefect_api_url}"},
        volume="esmm-runs",
        mount="/app/runs",
        stores=("optuna",),
    ),
    Service(
        name="tune-worker",
        command=(
            "esmm",
            "tune-worker",
            "--config",
            DEFAULT_CONFIG,
            "--set",
            "tracking.tracking_uri={mlflow_url}",
            "--set",
            "tune.storage={optuna_store}",
        ),
        volume="esmm-runs",
        mount="/app/runs",
        stores=("optuna",),
        profile="tuning",
    ),
)

SERVICES_BY_NAME = {service.name: service for service in SERVICES}

# The addresses inside docker/compose.yaml: service names, container ports, volume mounts.
# ${POSTGRES_USER} is filled by compose from the env file; the password travels as PGPASSWORD.
_COMPOSE_POSTGRES = "${POSTGRES_USER}@postgres:5432"
COMPOSE_VALUES = {
    "bind_host": "0.0.0.0",
    "mlflow_port": "5000",
    "prefect_port": "4200",
    "mlflow_url": "http://mlflow:5000",
    "prefect_api_url": "http://prefect-server:4200/api",
    "mlflow_artifacts": SERVICES_BY_NAME["mlflow"].mount,
    "mlflow_allowed_hosts": "mlflow:5000,localhost:*,127.0.0.1:*",
    **{
        f"{store.name}_store": f"{store.driver}://{_COMPOSE_POSTGRES}/{store.database('esmm')}"
        for store in STORES
    },
}


class StackError(RuntimeError):
    """The stack cannot start or stop, or its state is unknown; the message says what to do."""


@dataclass(frozen=True)
class StackSettings:
    """Where and how `esmm stack up` runs the servers. Port 0 picks a free port."""

    folder: Path = DEFAULT_FOLDER
    postgres_url: str = DEFAULT_POSTGRES_URL  # any database on the server; used to create ours
    host: str = "127.0.0.1"
    mlflow_port: int = 5000
    prefect_port: int = 4200
    database_prefix: str = "esmm"  # databases <prefix>_mlflow, <prefix>_prefect, <prefix>_optuna
    start_timeout: float = START_TIMEOUT_SECONDS


def fill(template: str, values: dict[str, str]) -> str:
    """A command or environment template with its placeholders filled."""
    return template.format_map(values)


def service_command(service: Service, values: dict[str, str]) -> list[str]:
    return [fill(part, values) for part in service.command]


def service_environment(service: Service, values: dict[str, str]) -> dict[str, str]:
    return {key: fill(value, values) for key, value in service.environment.items()}


def _postgres(url: str):
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        raise StackError(f"not a database URL: {url!r}") from None
    if not parsed.drivername.startswith("postgresql"):
        raise StackError(f"need a PostgreSQL URL, got {parsed.render_as_string()}")
    return parsed


def store_url(postgres_url: str, store: Store, prefix: str) -> str:
    """The store's database on the server of ``postgres_url``, with its driver and without
    the password (the servers get it as PGPASSWORD)."""
    from sqlalchemy.engine import URL

    server = _postgres(postgres_url)
    url = URL.create(
        store.driver, server.username, None, server.host, server.port, store.database(prefix)
    )
    return url.render_as_string(hide_password=False)


def _client_host(bind_host: str) -> str:
    return "127.0.0.1" if bind_host in ("0.0.0.0", "") else bind_host


def process_values(settings: StackSettings) -> dict[str, str]:
    """The template values for local processes: loopback ports, folders under the stack's."""
    client = _client_host(settings.host)
    allowed = ["localhost:*", "127.0.0.1:*"]
    if client not in ("127.0.0.1", "localhost"):
        allowed.append(f"{client}:*")
    mlflow = SERVICES_BY_NAME["mlflow"]
    return {
        "bind_host": settings.host,
        "mlflow_port": str(settings.mlflow_port),
        "prefect_port": str(settings.prefect_port),
        "mlflow_url": f"http://{client}:{settings.mlflow_port}",
        "prefect_api_url": f"http://{client}:{settings.prefect_port}/api",
        "mlflow_artifacts": str(settings.folder.resolve() / mlflow.volume),
        "mlflow_allowed_hosts": ",".join(allowed),
        **{
            f"{store.name}_store": store_url(settings.postgres_url, store, settings.database_prefix)
            for store in STORES
        },
    }


def create_databases(postgres_url: str, names: list[str]) -> list[str]:
    """Create each named database that the server lacks; return the ones created."""
    import psycopg2
    from psycopg2 import sql

    parsed = _postgres(postgres_url)
    try:
        connection = psycopg2.connect(
            host=parsed.host or "127.0.0.1",
            port=parsed.port or 5432,
            user=parsed.username,
            password=parsed.password,
            dbname=parsed.database or "postgres",
            connect_timeout=5,
        )
    except psycopg2.OperationalError as error:
        where = parsed.render_as_string()
        raise StackError(f"cannot connect to PostgreSQL at {where}: {error}".strip()) from None
    connection.autocommit = True  # CREATE DATABASE cannot run inside a transaction
    created = []
    try:
        with connection.cursor() as cursor:
            for name in names:
                cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if cursor.fetchone() is None:
                    cursor.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
                    created.append(name)
    finally:
        connection.close()
    return created


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (for tests and `--*-port 0`)."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


@dataclass
class ServiceProcess:
    """A server started by `esmm stack up`, as the state file records it."""

    name: str
    pid: int  # also its process-group id
    started_ticks: int | None  # its /proc start time: tells it from a later process with its pid
    url: str
    health_url: str
    log: str
    ready_seconds: float | None = None


@dataclass
class Stack:
    """A running stack: where its servers answer and what clients should be given."""

    folder: str
    mlflow_url: str
    prefect_api_url: str
    tune_storage: str
    databases: list[str]
    processes: list[ServiceProcess]
    created_databases: list[str] = field(default_factory=list)  # by this `up`
    password_from_env: bool = False  # the servers got PGPASSWORD; clients need it too

    def environment(self) -> dict[str, str]:
        return {"MLFLOW_TRACKING_URI": self.mlflow_url, "PREFECT_API_URL": self.prefect_api_url}

    def config_overrides(self) -> list[str]:
        """`--set` overrides that point a config at this stack."""
        return [f"tracking.tracking_uri={self.mlflow_url}", f"tune.storage={self.tune_storage}"]

    def usage(self) -> str:
        """What to type to use the stack (printed by `esmm stack up`)."""
        import shlex

        sets = " ".join(f"--set {shlex.quote(override)}" for override in self.config_overrides())
        worker = service_command(
            SERVICES_BY_NAME["prefect-worker"],
            {"mlflow_url": self.mlflow_url, "optuna_store": self.tune_storage},
        )
        lines = [f"export {key}={value}" for key, value in self.environment().items()]
        if self.password_from_env:
            lines.append("export PGPASSWORD=...  # the password of the PostgreSQL URL")
        lines += [
            f"# config keys: tracking.tracking_uri={self.mlflow_url}",
            f"#              tune.storage={self.tune_storage}",
            f"python -m flows.pipeline -c {DEFAULT_CONFIG} {sets}   # one run",
            f"python {shlex.join(worker[1:])}   # serve the daily schedule",
            f"esmm stack down --folder {self.folder}",
        ]
        return "\n".join(lines)


# Servers started by this process: kept so they can be reaped (waited for) once stopped.
_CHILDREN: dict[int, subprocess.Popen] = {}


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, process group, start time) of a process from /proc; None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], int(fields[2]), int(fields[19])


def _group_members(pgid: int) -> list[int]:
    """The live (not zombie) processes of a process group."""
    if not Path("/proc/self/stat").exists():  # no /proc (macOS): ask the kernel
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return []
        except PermissionError:
            pass
        return [pgid]
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _proc_stat(int(entry.name))
            if stat is not None and stat[1] == pgid and stat[0] not in ("Z", "X"):
                members.append(int(entry.name))
    return members


def _is_ours(process: ServiceProcess) -> bool:
    """False when the recorded pid now belongs to another process (the pid was reused)."""
    stat = _proc_stat(process.pid)
    if stat is None or process.started_ticks is None:
        return True
    return stat[2] == process.started_ticks


def is_running(process: ServiceProcess) -> bool:
    return _is_ours(process) and bool(_group_members(process.pid))


def _reap(pid: int) -> None:
    child = _CHILDREN.pop(pid, None)
    if child is not None:
        child.wait(timeout=STOP_TIMEOUT_SECONDS)


def _stop_group(process: ServiceProcess, timeout: float) -> str:
    """SIGTERM the server's process group, SIGKILL what is left after ``timeout``."""
    if not is_running(process):
        _reap(process.pid)
        return "had already stopped"
    os.killpg(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _group_members(process.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    outcome = "stopped"
    if _group_members(process.pid):
        os.killpg(process.pid, signal.SIGKILL)
        outcome = f"killed (still running {timeout:.0f} s after SIGTERM)"
        while _group_members(process.pid):
            time.sleep(0.1)
    _reap(process.pid)
    return outcome


def _healthy(url: str) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxy
    try:
        with opener.open(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _log_tail(path: str) -> str:
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(lines[-LOG_TAIL_LINES:])


def _program(name: str) -> str:
    """A console script of this environment (beside its python), else from PATH."""
    import shutil

    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise StackError(f"{name!r} not found beside {sys.executable} or on PATH")
    return found


def _check_port_free(host: str, port: int) -> None:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            raise StackError(
                f"port {port} on {host} is taken ({error.strerror}); choose another port"
            ) from None


def _server_environment(settings: StackSettings, folder: Path) -> dict[str, str]:
    """The servers' environment: quiet and offline, Prefect's home in the stack folder, the
    PostgreSQL password (if the URL has one) as PGPASSWORD."""
    env = dict(os.environ)
    for client_setting in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI"):
        env.pop(client_setting, None)  # a server is not a client; Prefect's UI would follow it
    env.update(
        MLFLOW_DISABLE_TELEMETRY="true",
        DO_NOT_TRACK="1",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_HOME=str(folder / "prefect-home"),
        PYTHONUNBUFFERED="1",
    )
    password = _postgres(settings.postgres_url).password
    if password:
        env["PGPASSWORD"] = password
    return env


def _launch(
    service: Service, values: dict[str, str], env: dict[str, str], folder: Path, port: int
) -> ServiceProcess:
    """Start one server in its own process group, its output appended to its log."""
    argv = service_command(service, values)
    log = folder / "logs" / f"{service.name}.log"
    with log.open("ab") as out:
        out.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n".encode())
        out.flush()
        child = subprocess.Popen(
            [_program(argv[0]), *argv[1:]],
            env={**env, **service_environment(service, values)},
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=folder,
            start_new_session=True,
        )
    _CHILDREN[child.pid] = child
    stat = _proc_stat(child.pid)
    url = f"http://{_client_host(values['bind_host'])}:{port}"
    return ServiceProcess(
        name=service.name,
        pid=child.pid,
        started_ticks=stat[2] if stat else None,
        url=url,
        health_url=url + (service.health_path or "/"),
        log=str(log),
    )


def _wait_until_healthy(processes: list[ServiceProcess], timeout: float) -> None:
    started = time.monotonic()
    pending = list(processes)
    while pending:
        for process in list(pending):
            if _healthy(process.health_url):
                process.ready_seconds = round(time.monotonic() - started, 1)
                pending.remove(process)
                continue
            child = _CHILDREN.get(process.pid)
            if child is not None and child.poll() is not None:
                raise StackError(
                    f"{process.name} exited with code {child.returncode} while starting; "
                    f"the end of {process.log}:\n{_log_tail(process.log)}"
                )
        if pending and time.monotonic() - started > timeout:
            tails = "\n".join(f"--- {p.log}\n{_log_tail(p.log)}" for p in pending)
            names = ", ".join(p.name for p in pending)
            raise StackError(f"{names} not healthy after {timeout:.0f} s:\n{tails}")
        if pending:
            time.sleep(0.5)


def _state_path(folder: Path) -> Path:
    return Path(folder) / STATE_FILE


def read_state(folder: Path) -> Stack | None:
    """The stack recorded in ``folder``; None if there is none."""
    path = _state_path(folder)
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        processes = [ServiceProcess(**process) for process in data.pop("processes")]
        return Stack(**data, processes=processes)
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        raise StackError(
            f"{path} is not a stack state file ({error}); check that no mlflow/prefect "
            "server from it still runs, then delete it"
        ) from None


def _write_state(stack: Stack) -> None:
    with atomic_path(_state_path(Path(stack.folder))) as tmp:
        tmp.write_text(json.dumps(asdict(stack), indent=2) + "\n")


_PREFIX = re.compile(r"[a-z_][a-z0-9_]{0,40}")


def start_stack(settings: StackSettings) -> Stack:
    """Create the databases if missing, start the MLflow and Prefect servers, wait until both
    answer their health checks and record them in ``<folder>/stack.json``."""
    if not _PREFIX.fullmatch(settings.database_prefix):
        raise StackError(
            f"database prefix {settings.database_prefix!r}: use lower-case letters, digits, _"
        )
    folder = settings.folder.resolve()
    previous = read_state(folder)
    if previous is not None and any(is_running(p) for p in previous.processes):
        raise StackError(
            f"a stack already runs from {folder} (pids "
            f"{', '.join(str(p.pid) for p in previous.processes)}); "
            f"stop it first: esmm stack down --folder {settings.folder}"
        )
    ports = {
        "mlflow": settings.mlflow_port or free_port(settings.host),
        "prefect-server": settings.prefect_port or free_port(settings.host),
    }
    for port in ports.values():
        _check_port_free(settings.host, port)
    settings = replace(
        settings, folder=folder, mlflow_port=ports["mlflow"], prefect_port=ports["prefect-server"]
    )
    values = process_values(settings)
    databases = [store.database(settings.database_prefix) for store in STORES]
    created = create_databases(settings.postgres_url, databases)
    (folder / "logs").mkdir(parents=True, exist_ok=True)
    Path(values["mlflow_artifacts"]).mkdir(parents=True, exist_ok=True)
    env = _server_environment(settings, folder)
    stack = Stack(
        folder=str(folder),
        mlflow_url=values["mlflow_url"],
        prefect_api_url=values["prefect_api_url"],
        tune_storage=values["optuna_store"],
        databases=databases,
        processes=[],
        created_databases=created,
        password_from_env=bool(_postgres(settings.postgres_url).password),
    )
    try:
        for service in SERVICES:
            if service.local:
                process = _launch(service, values, env, folder, ports[service.name])
                stack.processes.append(process)
                _write_state(stack)  # written at once, so `down` can stop a start cut short
        _wait_until_healthy(stack.processes, settings.start_timeout)
    except BaseException:
        for process in stack.processes:
            _stop_group(process, STOP_TIMEOUT_SECONDS)
        _state_path(folder).unlink(missing_ok=True)
        raise
    _write_state(stack)
    return stack


def stop_stack(folder: Path, timeout: float = STOP_TIMEOUT_SECONDS) -> dict[str, str] | None:
    """Stop every server recorded in ``folder`` (SIGTERM, SIGKILL after ``timeout``) and remove
    the state file; returns what happened to each, or None when no stack is recorded there."""
    stack = read_state(folder)
    if stack is None:
        return None
    outcome = {process.name: _stop_group(process, timeout) for process in stack.processes}
    _state_path(folder).unlink(missing_ok=True)
    return outcome


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    pid: int
    running: bool
    healthy: bool
    url: str
    log: str


def stack_status(folder: Path) -> tuple[Stack, list[ServiceStatus]]:
    """Each recorded server: is its process group alive, does it answer its health check."""
    stack = read_state(folder)
    if stack is None:
        raise StackError(
            f"no stack recorded in {Path(folder) / STATE_FILE}: start one with "
            f"esmm stack up --folder {folder}"
        )
    statuses = [
        ServiceStatus(
            name=process.name,
            pid=process.pid,
            running=is_running(process),
            healthy=_healthy(process.health_url),
            url=process.url,
            log=process.log,
        )
        for process in stack.processes
    ]
    return stack, statuses


@contextmanager
def running_stack(
    folder: Path, postgres_url: str = DEFAULT_POSTGRES_URL, **options
) -> Iterator[Stack]:
    """Start the stack for the length of a block (tests, scripts); ``options`` are
    :class:`StackSettings` fields (ports 0: free ports)."""
    stack = start_stack(StackSettings(folder=Path(folder), postgres_url=postgres_url, **options))
    try:
        yield stack
    finally:
        stop_stack(Path(stack.folder))
