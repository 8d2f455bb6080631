"""docker/ checked without Docker: compose.yaml must run exactly the topology of esmm/stack.py
(the one `esmm stack up` runs as processes), publish only the UIs on loopback, keep secrets in
the env file, run containers as non-root, and the image must pin the CPU build of torch."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from esmm.stack import (
    COMPOSE_VALUES,
    SERVICES,
    SERVICES_BY_NAME,
    STORES,
    service_command,
    service_environment,
)

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
VARIABLE = re.compile(r"\$\{(\w+)(?::?[-?][^}]*)?\}")
OUR_IMAGE = "esmm:latest"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    pairs = {}
    for line in (DOCKER / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return (DOCKER / "Dockerfile").read_text()


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR:?error} with the env file's values."""

    def value(match: re.Match) -> str:
        name, whole = match.group(1), match.group(0)
        if env.get(name):
            return env[name]
        return whole.split(":-", 1)[1][:-1] if ":-" in whole else ""

    return VARIABLE.sub(value, text)


def named_volumes(service: dict) -> dict[str, str]:
    """volume name -> mount point of a service's named (not bind-mounted) volumes."""
    mounts = {}
    for entry in service.get("volumes", []):
        source, target = entry.split(":")[:2]
        if not source.startswith((".", "/")):
            mounts[source] = target
    return mounts


def test_compose_runs_the_described_services(compose):
    assert set(compose["services"]) == {service.name for service in SERVICES}
    for service in SERVICES:
        declared = compose["services"][service.name]
        assert declared.get("profiles", [None])[0] == service.profile, service.name


def test_commands_and_environments_are_the_described_ones(compose):
    for service in SERVICES:
        declared = compose["services"][service.name]
        if declared.get("image") != OUR_IMAGE:
            continue  # postgres: the official image's own command
        assert declared["command"] == service_command(service, COMPOSE_VALUES), service.name
        environment = declared.get("environment", {})
        for key, value in service_environment(service, COMPOSE_VALUES).items():
            assert environment.get(key) == value, f"{service.name}: {key}"
    assert compose["services"]["tune-worker"]["command"][:2] == ["esmm", "tune-worker"]
    assert compose["services"]["prefect-worker"]["environment"]["PREFECT_API_URL"] == (
        "http://prefect-server:4200/api"
    )


def test_only_the_uis_are_published_and_on_loopback(compose, env_example):
    published = {}
    for name, declared in compose["services"].items():
        for entry in declared.get("ports", []):
            host, host_port, container_port = interpolate(entry, env_example).split(":")
            assert interpolate(entry, {}).startswith("127.0.0.1:"), "default bind address"
            published[name] = (host, int(host_port), int(container_port))
    assert published == {
        service.name: ("127.0.0.1", service.port, service.port)
        for service in SERVICES
        if service.published
    }
    assert set(published) == {"mlflow", "prefect-server"}


def test_volumes_are_the_described_named_volumes(compose):
    for service in SERVICES:
        mounts = named_volumes(compose["services"][service.name])
        expected = {service.volume: service.mount} if service.volume else {}
        assert mounts == expected, service.name
    assert set(compose["volumes"]) == {s.volume for s in SERVICES if s.volume}
    assert COMPOSE_VALUES["mlflow_artifacts"] == SERVICES_BY_NAME["mlflow"].mount


def test_init_script_creates_one_database_per_store(compose):
    init = DOCKER / "postgres-init.sql"
    created = re.findall(r"CREATE DATABASE (\w+);", init.read_text())
    assert created == [store.database("esmm") for store in STORES]
    mounted = [v for v in compose["services"]["postgres"]["volumes"] if v.startswith("./")]
    assert mounted == [f"./{init.name}:/docker-entrypoint-initdb.d/10-esmm-databases.sql:ro"]
    used = set(re.findall(r"@postgres:5432/(\w+)", (DOCKER / "compose.yaml").read_text()))
    assert used == set(created)
    for service in SERVICES:
        if service.name != "postgres":
            declared = str(compose["services"][service.name])
            for store in service.stores:
                assert f"@postgres:5432/esmm_{store}" in declared, (service.name, store)


def test_servers_have_healthchecks_that_gate_their_clients(compose):
    for service in SERVICES:
        declared = compose["services"][service.name]
        if service.port is None:
            continue
        test = " ".join(declared["healthcheck"]["test"])
        if service.health_path:
            assert f"127.0.0.1:{service.port}{service.health_path}" in test
        else:
            assert "pg_isready" in test
    for name, declared in compose["services"].items():
        for dependency, condition in declared.get("depends_on", {}).items():
            assert condition == {"condition": "service_healthy"}, (name, dependency)
            assert "healthcheck" in compose["services"][dependency]


def test_containers_run_as_non_root(compose, dockerfile):
    users = re.findall(r"^USER\s+(\S+)", dockerfile, flags=re.MULTILINE)
    assert users and users[-1] not in ("root", "0", "0:0")
    assert re.search(rf"useradd[^\n]*{users[-1]}", dockerfile)
    for name, declared in compose["services"].items():
        if declared.get("image") == OUR_IMAGE:
            assert declared.get("user") in (None, users[-1]), name  # the image's USER
        else:
            assert declared.get("user") not in (None, "root", "0"), name


def test_image_pins_cpu_torch_and_installs_dependencies_before_code(dockerfile):
    assert dockerfile.startswith("#") and "FROM python:3.11-slim" in dockerfile
    torch = re.search(r"pip install .*--index-url (\S+) torch==(\S+)", dockerfile)
    assert torch and torch.groups() == ("https://download.pytorch.org/whl/cpu", "2.13.0")
    assert '"torch==2.13.0"' in (ROOT / "pyproject.toml").read_text()
    assert dockerfile.index("torch==2.13.0") < dockerfile.index("COPY esmm")
    assert dockerfile.index("requirements.txt") < dockerfile.index("COPY esmm")
    for install in re.findall(r"pip install[^\n]*", dockerfile):
        assert "--no-cache-dir" in install


def test_env_example_defines_every_variable_and_holds_no_secret(compose, env_example):
    text = (DOCKER / "compose.yaml").read_text()
    used = set(VARIABLE.findall(text))
    assert used <= set(env_example), used - set(env_example)
    for key, value in env_example.items():
        if re.search(r"PASSWORD|SECRET|TOKEN|KEY", key):
            assert value == "", f"{key} must stay empty in the committed example"
    assert "${POSTGRES_PASSWORD:?" in text  # compose refuses to start without a password
    assert not re.search(r"://[^/\s:@]+:[^@\s]+@", text), "a password inside a URL"
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "runs", "docker/.env"} <= set(ignored)


def test_team_doc_names_the_one_command():
    command = "docker compose --env-file docker/.env -f docker/compose.yaml up -d"
    assert command in (ROOT / "docs" / "TEAM.md").read_text()
    assert command in (DOCKER / "compose.yaml").read_text()
