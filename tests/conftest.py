"""Shared test set-up: offline, quiet libraries and the path to the real data samples."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """../shared/data beside the checkout (CI has it too); skip where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data samples not found at {SHARED_DATA}")
    return SHARED_DATA


POSTGRES = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}


@pytest.fixture
def postgres_database():
    """A factory of fresh PostgreSQL databases on 127.0.0.1:5432 (trust auth, user postgres),
    each dropped at the end of the test; returns the SQLAlchemy URL. Skips where no server
    answers (CI and these machines have one)."""
    import uuid

    psycopg2 = pytest.importorskip("psycopg2")
    try:
        admin = psycopg2.connect(dbname="postgres", connect_timeout=3, **POSTGRES)
    except psycopg2.OperationalError as error:
        pytest.skip(f"no PostgreSQL on 127.0.0.1:5432: {error}")
    admin.autocommit = True
    created: list[str] = []

    def create(purpose: str = "test") -> str:
        name = f"esmm_{purpose}_{uuid.uuid4().hex[:10]}"
        with admin.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
        created.append(name)
        return f"postgresql+psycopg2://postgres@127.0.0.1:5432/{name}"

    yield create
    with admin.cursor() as cursor:
        for name in created:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.close()


@pytest.fixture(scope="module")
def database_prefix():
    """A unique database prefix per test module; the stack creates <prefix>_mlflow/_prefect/
    _optuna, dropped here at the end. Skips where no PostgreSQL answers on 127.0.0.1:5432."""
    import uuid

    from esmm.stack import STORES

    psycopg2 = pytest.importorskip("psycopg2")
    try:
        admin = psycopg2.connect(
            host="127.0.0.1", port=5432, user="postgres", dbname="postgres", connect_timeout=3
        )
    except psycopg2.OperationalError as error:
        pytest.skip(f"no PostgreSQL on 127.0.0.1:5432: {error}")
    admin.autocommit = True
    prefix = f"esmm_stack_{uuid.uuid4().hex[:8]}"
    yield prefix
    with admin.cursor() as cursor:
        for store in STORES:
            cursor.execute(f'DROP DATABASE IF EXISTS "{store.database(prefix)}" WITH (FORCE)')
    admin.close()
