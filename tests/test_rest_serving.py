"""REST serving of a registry alias with MLflow's scoring server: rows of raw features in,
the same scores as in-process scoring out; every malformed request a 4xx naming the problem."""

from __future__ import annotations

import json
import shlex
import shutil
import socket
import subprocess
import urllib.error
import urllib.request

import numpy as np
import pytest
from trained_models import log_trained_model, train_small_model
from typer.testing import CliRunner

from esmm.cli import app
from esmm.models import load_trained_model
from esmm.serving import (
    OUTPUT_COLUMNS,
    ServingError,
    curl_example,
    score_table,
    serving_example,
    serving_process,
)

pytestmark = [pytest.mark.services, pytest.mark.slow]

MODEL_NAME = "esmm-cvr-rest"
CHAMPION_URI = f"models:/{MODEL_NAME}@champion"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A small trained ESMM, registered with alias champion in a SQLite store and served from
    ``models:/<name>@champion`` for the whole module."""
    from mlflow.tracking import MlflowClient

    from esmm.registry import register_version

    config, test = train_small_model(tmp_path_factory.mktemp("rest"))
    store = config.tracking.tracking_uri
    model_uri, run_id = log_trained_model(config, test)
    client = MlflowClient(store, store)
    version = register_version(client, model_uri, MODEL_NAME, run_id, {})
    client.set_registered_model_alias(MODEL_NAME, "champion", version)
    with serving_process(CHAMPION_URI, free_port(), store) as url:
        yield url, config, test


def post(url: str, body: bytes | dict) -> tuple[int, dict]:
    """Status and decoded JSON answer of POST /invocations."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(
        f"{url}/invocations", data=data, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def records(config, table) -> list[dict]:
    """JSON-able rows of the raw feature columns (lists for multi-valued fields)."""
    _, encoder, _ = load_trained_model(config.output_path / "model")
    return table.select(encoder.schema.names()).to_pylist()


def in_process_scores(config, table) -> np.ndarray:
    model, encoder, _ = load_trained_model(config.output_path / "model")
    return score_table(model, encoder, table).to_numpy()


def predictions_array(answer: dict) -> np.ndarray:
    return np.array([[row[name] for name in OUTPUT_COLUMNS] for row in answer["predictions"]])


@pytest.mark.parametrize("rows", [1, 1000])
def test_records_score_as_in_process(served, rows):
    url, config, test = served
    table = test.slice(0, rows)
    status, answer = post(url, {"dataframe_records": records(config, table)})
    assert status == 200, answer
    scores = predictions_array(answer)
    assert scores.shape == (rows, 3)
    np.testing.assert_allclose(scores, in_process_scores(config, table), rtol=0, atol=1e-6)


def test_split_format_scores_as_in_process(served):
    url, config, test = served
    table = test.slice(100, 25)
    rows = records(config, table)
    columns = list(rows[0])
    body = {"dataframe_split": {"columns": columns, "data": [list(r.values()) for r in rows]}}
    status, answer = post(url, body)
    assert status == 200, answer
    np.testing.assert_allclose(
        predictions_array(answer), in_process_scores(config, table), rtol=0, atol=1e-6
    )


def _with(row: dict, **changes) -> dict:
    return {"dataframe_records": [{**row, **changes}]}


def _without(row: dict, name: str) -> dict:
    return {"dataframe_records": [{k: v for k, v in row.items() if k != name}]}


MALFORMED = {  # case -> (request body from one good row, words the message must contain)
    "missing field": (lambda row: _without(row, "item_id"), ["item_id"]),
    "string for an integer id": (lambda row: _with(row, user_id="abc"), ["user_id"]),
    "null for a required id": (lambda row: _with(row, user_id=None), ["user_id"]),
    "scalar for a list field": (
        lambda row: _with(row, user_interest_categories=3),
        ["user_interest_categories", "list"],
    ),
    "strings in a list field": (
        lambda row: _with(row, user_interest_categories=["a"]),
        ["user_interest_categories"],
    ),
    "string for a dense value": (lambda row: _with(row, item_price_log="x"), ["item_price_log"]),
    "empty body": (lambda row: b"", ["JSON"]),
    "invalid JSON": (lambda row: b'{"dataframe_records": [', ["JSON"]),
    "no format key": (lambda row: {"rows": [row]}, ["dataframe_records", "dataframe_split"]),
    "no records": (lambda row: {"dataframe_records": []}, ["missing inputs", "item_id"]),
    "no rows in split": (  # passes MLflow's checks; ESMMPyfunc.predict rejects it
        lambda row: {"dataframe_split": {"columns": list(row), "data": []}},
        ["no rows"],
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_request_gets_4xx_naming_the_problem(served, case):
    url, config, test = served
    build, words = MALFORMED[case]
    status, answer = post(url, build(records(config, test.slice(0, 1))[0]))
    assert 400 <= status < 500, answer
    for word in words:
        assert word in answer["message"], answer["message"]


def test_bad_input_reaching_the_model_is_an_invalid_parameter_error(served):
    """In process, past MLflow's signature checks: the error code the server turns into 400."""
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException

    _, config, test = served
    mlflow.set_registry_uri(config.tracking.tracking_uri)
    python_model = mlflow.pyfunc.load_model(CHAMPION_URI).unwrap_python_model()
    frame = test.slice(0, 3).to_pandas()
    frame["user_id"] = [[1], [2], [3]]
    with pytest.raises(MlflowException, match="user_id") as raised:
        python_model.predict(None, frame)
    assert raised.value.error_code == "INVALID_PARAMETER_VALUE"


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_printed_curl_example_works(served):
    import mlflow

    url, config, _ = served
    mlflow.set_registry_uri(config.tracking.tracking_uri)
    command = curl_example(url, serving_example(CHAMPION_URI))
    output = subprocess.run(shlex.split(command), capture_output=True, check=True).stdout
    answer = json.loads(output)
    assert list(answer["predictions"][0]) == list(OUTPUT_COLUMNS)


def test_serve_refuses_a_model_that_does_not_resolve(served):
    _, config, _ = served
    result = CliRunner().invoke(
        app,
        [
            "serve",
            "--model",
            f"models:/{MODEL_NAME}-absent@champion",
            "--tracking-uri",
            config.tracking.tracking_uri,
        ],
    )
    assert result.exit_code == 1
    assert f"{MODEL_NAME}-absent" in result.output


def test_serving_process_refuses_a_port_in_use(served):
    url, config, _ = served
    port = int(url.rsplit(":", 1)[1])
    taken = serving_process(CHAMPION_URI, port, config.tracking.tracking_uri)
    with pytest.raises(ServingError, match="in use"), taken:
        pass


def test_serving_process_reports_a_server_that_cannot_start(served):
    _, config, _ = served
    absent = serving_process(
        f"models:/{MODEL_NAME}-absent@champion", free_port(), config.tracking.tracking_uri
    )
    with pytest.raises(ServingError, match=f"{MODEL_NAME}-absent"), absent:
        pass
