"""Serving a trained model: the MLflow pyfunc wrapper (raw feature values in, pctr/pcvr/pctcvr
out), batch scoring of files with any model URI (``models:/esmm-cvr@champion``), and REST
serving of such a URI with MLflow's own scoring server (``mlflow models serve``).

The pyfunc model carries the trained folder (weights, spec, encoder) as an artifact, so a
registry URI is all a consumer needs: encoding happens inside, exactly as in training.
It is logged "from code" (esmm/pyfunc_entry.py), not pickled.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from esmm.atomic import atomic_path
from esmm.data.encode import FeatureEncoder
from esmm.data.table import DataError, FieldKind

log = logging.getLogger(__name__)

MODEL_ARTIFACT = "trained_model"
OUTPUT_COLUMNS = ("pctr", "pcvr", "pctcvr")
PRECISION_PARAM = "precision"  # the pyfunc's parameter: "float32" (default) or "bfloat16"
SCORING_BATCH_ROWS = 200_000
ARROW_INPUT_ERRORS = (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError)
SERVE_HOST = "127.0.0.1"
SERVE_PORT = 5001


def score_table(
    model,
    encoder: FeatureEncoder,
    table: pa.Table,
    batch_size: int = 65536,
    precision: str = "float32",
):
    """pctr, pcvr and pctcvr for raw rows (the canonical table's feature columns); NaN for an
    output the model does not have (BASE has no pCTR). ``precision``: see
    :func:`esmm.train.predict` ("bfloat16" is faster where the CPU has it)."""
    from esmm.train import predict

    pctr, pcvr = predict(model, encoder.transform(table), batch_size, precision)
    nan = np.full(table.num_rows, np.nan, dtype=np.float32)
    pctr = nan if pctr is None else pctr
    pcvr = nan if pcvr is None else pcvr
    return pd.DataFrame({"pctr": pctr, "pcvr": pcvr, "pctcvr": pctr * pcvr}).astype("float64")


def _frame_to_table(frame: pd.DataFrame, encoder: FeatureEncoder) -> pa.Table:
    names = encoder.schema.names()
    missing = [name for name in names if name not in frame.columns]
    if missing:
        raise DataError(f"input rows lack the feature columns {missing}")
    try:
        return pa.Table.from_pandas(frame[names], preserve_index=False)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
        raise DataError(f"input rows cannot be read as features: {error}") from error


class ESMMPyfunc(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc: a DataFrame of raw feature values in, pctr/pcvr/pctcvr out."""

    def load_context(self, context) -> None:
        from esmm.models import load_trained_model

        self.model, self.encoder, self.spec = load_trained_model(context.artifacts[MODEL_ARTIFACT])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        """Bad rows raise MlflowException(INVALID_PARAMETER_VALUE) with the problem named: the
        scoring server answers that with 400 and the message, any other error with a generic
        one."""
        from mlflow.exceptions import MlflowException

        from esmm.train import PRECISIONS

        precision = (params or {}).get(PRECISION_PARAM, "float32")
        if precision not in PRECISIONS:
            raise MlflowException.invalid_parameter_value(
                f"{PRECISION_PARAM} must be one of {PRECISIONS}, got {precision!r}"
            )
        if not isinstance(model_input, pd.DataFrame):
            model_input = pd.DataFrame(model_input)
        try:
            if len(model_input) == 0:
                raise DataError("the input has no rows to score")
            table = _frame_to_table(model_input, self.encoder)
            return score_table(self.model, self.encoder, table, precision=precision)
        except (DataError, *ARROW_INPUT_ERRORS) as error:
            raise MlflowException.invalid_parameter_value(str(error)) from error


def model_signature(encoder: FeatureEncoder, example: pa.Table):
    """Input columns as in the canonical table (ids long or string, multi-valued ids as
    arrays, dense values double), outputs pctr, pcvr, pctcvr; one parameter, the scoring
    precision ("float32" or "bfloat16")."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema
    from mlflow.types.schema import Array, ParamSchema, ParamSpec

    def id_type(name: str) -> DataType:
        vocabulary = encoder.vocabularies[name]
        is_text = pa.types.is_string(vocabulary.type) or pa.types.is_large_string(vocabulary.type)
        return DataType.string if is_text else DataType.long

    inputs = []
    for spec in encoder.schema.fields:
        if spec.kind == FieldKind.SINGLE:
            inputs.append(ColSpec(id_type(spec.name), spec.name, required=not spec.allow_missing))
        elif spec.kind == FieldKind.MULTI:
            inputs.append(ColSpec(Array(id_type(spec.name)), spec.name))
        else:
            inputs.append(ColSpec(DataType.double, spec.name, required=not spec.allow_missing))
    outputs = [ColSpec(DataType.double, name) for name in OUTPUT_COLUMNS]
    params = ParamSchema([ParamSpec(PRECISION_PARAM, DataType.string, "float32")])
    return ModelSignature(inputs=Schema(inputs), outputs=Schema(outputs), params=params)


def input_example(encoder: FeatureEncoder, table: pa.Table, rows: int = 5) -> pd.DataFrame:
    """A few raw rows (plain Python values, lists for multi-valued fields)."""
    head = table.select(encoder.schema.names()).slice(0, rows)
    return pd.DataFrame(head.to_pylist())


def log_pyfunc_model(model_dir: str | Path, example_table: pa.Table, name: str = "model"):
    """Log the trained folder as a pyfunc model in the active MLflow run; returns ModelInfo."""
    from esmm import pyfunc_entry
    from esmm.models import load_trained_model

    _, encoder, _ = load_trained_model(model_dir)
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=pyfunc_entry.__file__,
        artifacts={MODEL_ARTIFACT: str(model_dir)},
        signature=model_signature(encoder, example_table),
        input_example=input_example(encoder, example_table),
        pip_requirements=_requirements(),
    )


def _requirements() -> list[str]:
    """The pinned runtime requirements of this package (what a serving environment needs)."""
    from importlib.metadata import PackageNotFoundError, requires, version

    try:
        pins = [r for r in requires("esmm") or [] if "extra ==" not in r]
        return [f"esmm=={version('esmm')}", *pins]
    except PackageNotFoundError:  # running from a source tree that is not installed
        return ["torch==2.13.0", "pandas", "pyarrow", "mlflow"]


def load_model(model_uri: str):
    """A pyfunc model from a registry or run URI; a clear error when it does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return mlflow.pyfunc.load_model(model_uri)
    except MlflowException as error:
        raise FileNotFoundError(f"cannot load model {model_uri!r}: {error.message}") from None


def _read_batches(path: Path):
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        yield from pq.ParquetFile(path).iter_batches(batch_size=SCORING_BATCH_ROWS)
    elif suffix == ".csv":
        from pyarrow import csv

        yield from csv.open_csv(path)
    else:
        raise DataError(f"{path}: unsupported input format {suffix!r}; use .parquet or .csv")


def predict_file(
    model_uri: str,
    input_path: str | Path,
    output_path: str | Path,
    keep: list[str] = (),
    precision: str = "float32",
) -> int:
    """Score every row of a Parquet/CSV file with ``model_uri``; write pctr/pcvr/pctcvr (and
    the ``keep`` columns) in the input's row order to ``output_path`` (Parquet), atomically.
    ``precision="bfloat16"`` scores faster where the CPU has bfloat16 (see
    :func:`esmm.train.predict`); a model logged before that option existed refuses it."""
    input_path, output_path = Path(input_path), Path(output_path)
    if not input_path.exists():
        raise FileNotFoundError(f"input file not found: {input_path}")
    model = load_model(model_uri)
    params = None
    if precision != "float32":  # MLflow would ignore an undeclared parameter, with a warning
        from esmm.registry import RegistryError

        declared = model.metadata.get_params_schema()
        if declared is None or PRECISION_PARAM not in [p.name for p in declared.params]:
            raise RegistryError(
                f"{model_uri} was logged without the '{PRECISION_PARAM}' parameter: score it in "
                "float32, or log it again"
            )
        params = {PRECISION_PARAM: precision}
    started, rows = time.perf_counter(), 0
    with atomic_path(output_path) as tmp:
        writer = None
        for batch in _read_batches(input_path):
            missing = [name for name in keep if name not in batch.schema.names]
            if missing:
                raise DataError(f"{input_path}: --keep columns {missing} are not in the file")
            frame = pa.Table.from_batches([batch]).to_pandas()
            try:
                scores = model.predict(frame, params=params)
            except Exception as error:  # MLflow wraps schema errors in its own types
                raise DataError(f"{input_path}: rows {rows}..: {error}") from error
            kept = {name: frame[name] for name in keep}
            out = pa.Table.from_pandas(pd.DataFrame({**kept, **scores}), preserve_index=False)
            if writer is None:
                writer = pq.ParquetWriter(tmp, out.schema)
            writer.write_table(out)
            rows += len(frame)
            seconds = time.perf_counter() - started
            log.info("scored %d rows (%.0f rows/s)", rows, rows / max(seconds, 1e-9))
        if writer is None:
            raise DataError(f"{input_path}: no rows to score")
        writer.close()
    return rows


class ServingError(RuntimeError):
    """The scoring server could not be started (port taken, model not loadable, no answer)."""


def serve_command(model_uri: str, port: int = SERVE_PORT, host: str = SERVE_HOST) -> list[str]:
    """``mlflow models serve`` with this interpreter. ``--env-manager local``: the model's code
    (esmm) is installed here, and building a fresh virtualenv per start would need the
    internet and minutes."""
    return [
        *(sys.executable, "-m", "mlflow", "models", "serve"),
        *("--model-uri", model_uri, "--env-manager", "local"),
        *("--host", host, "--port", str(port)),
    ]


def serve_environment(tracking_uri: str) -> dict[str, str]:
    """The server's environment: MLflow pointed at our store (so ``models:/`` URIs resolve),
    no telemetry or download bars, and this interpreter's bin folder first on PATH (MLflow
    starts ``uvicorn`` by name, which fails from an unactivated virtualenv)."""
    env = dict(os.environ)
    env.update(
        MLFLOW_TRACKING_URI=tracking_uri,
        MLFLOW_REGISTRY_URI=tracking_uri,
        MLFLOW_DISABLE_TELEMETRY="true",
        MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false",
    )
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def serving_example(model_uri: str) -> dict:
    """One row of the model's logged input example as a ``dataframe_records`` request body;
    fails clearly when the URI does not resolve (before a server is started for it)."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one small file
    try:
        path = mlflow.artifacts.download_artifacts(f"{model_uri}/serving_input_example.json")
    except (MlflowException, OSError) as error:
        message = getattr(error, "message", str(error))
        raise FileNotFoundError(f"cannot load model {model_uri!r}: {message}") from None
    split = json.loads(Path(path).read_text())["dataframe_split"]
    return {"dataframe_records": [dict(zip(split["columns"], split["data"][0], strict=True))]}


def curl_example(url: str, body: dict) -> str:
    """A shell command that posts ``body`` to the server's /invocations."""
    return shlex.join(
        [
            *("curl", "-s", f"{url}/invocations"),
            *("-H", "Content-Type: application/json", "-d", json.dumps(body)),
        ]
    )


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex((host, port)) == 0


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/ping", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


@contextlib.contextmanager
def serving_process(
    model_uri: str,
    port: int,
    tracking_uri: str,
    host: str = SERVE_HOST,
    startup_timeout: float = 120.0,
) -> Iterator[str]:
    """Run the scoring server for ``model_uri`` while the block runs; yields its base URL once
    GET /ping answers. The server (the mlflow CLI and its uvicorn) runs in its own process
    group, which is stopped on exit, so no process outlives the block."""
    url = f"http://{host}:{port}"
    if _port_in_use(host, port):  # /ping would be answered by whatever listens there
        raise ServingError(f"port {port} on {host} is already in use")
    with tempfile.TemporaryFile() as output:
        process = subprocess.Popen(
            serve_command(model_uri, port, host),
            env=serve_environment(tracking_uri),
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + startup_timeout
            while not _healthy(url):
                if process.poll() is not None or time.monotonic() > deadline:
                    output.seek(0)
                    tail = output.read().decode(errors="replace")[-3000:]
                    raise ServingError(f"the scoring server for {model_uri} did not start:\n{tail}")
                time.sleep(0.25)
            log.info("serving %s at %s", model_uri, url)
            yield url
        finally:
            _stop_group(process)


def _stop_group(process: subprocess.Popen) -> None:
    """SIGTERM to the server's process group; SIGKILL to whatever is left of it after 10 s.
    Waits for every member (uvicorn is the mlflow CLI's child), so the port is free after."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while _group_alive(process) and time.monotonic() < deadline:
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _group_alive(process: subprocess.Popen) -> bool:
    process.poll()  # reap the group leader, or its zombie keeps the group alive
    try:
        os.killpg(process.pid, 0)
    except ProcessLookupError:
        return False
    return True
