"""Serving a trained model: the MLflow pyfunc wrapper (raw feature values in, pctr/pcvr/pctcvr
out) and batch scoring of files with any model URI (``models:/esmm-cvr@champion``).

The pyfunc model carries the trained folder (weights, spec, encoder) as an artifact, so a
registry URI is all a consumer needs: encoding happens inside, exactly as in training.
It is logged "from code" (esmm/pyfunc_entry.py), not pickled.
"""

from __future__ import annotations

import logging
import time
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
SCORING_BATCH_ROWS = 200_000


def score_table(model, encoder: FeatureEncoder, table: pa.Table, batch_size: int = 65536):
    """pctr, pcvr and pctcvr for raw rows (the canonical table's feature columns); NaN for an
    output the model does not have (BASE has no pCTR)."""
    from esmm.train import predict

    pctr, pcvr = predict(model, encoder.transform(table), batch_size)
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
        if not isinstance(model_input, pd.DataFrame):
            model_input = pd.DataFrame(model_input)
        return score_table(self.model, self.encoder, _frame_to_table(model_input, self.encoder))


def model_signature(encoder: FeatureEncoder, example: pa.Table):
    """Input columns as in the canonical table (ids long or string, multi-valued ids as
    arrays, dense values double), outputs pctr, pcvr, pctcvr."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema
    from mlflow.types.schema import Array

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
    return ModelSignature(inputs=Schema(inputs), outputs=Schema(outputs))


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
    model_uri: str, input_path: str | Path, output_path: str | Path, keep: list[str] = ()
) -> int:
    """Score every row of a Parquet/CSV file with ``model_uri``; write pctr/pcvr/pctcvr (and
    the ``keep`` columns) in the input's row order to ``output_path`` (Parquet), atomically."""
    input_path, output_path = Path(input_path), Path(output_path)
    if not input_path.exists():
        raise FileNotFoundError(f"input file not found: {input_path}")
    model = load_model(model_uri)
    started, rows = time.perf_counter(), 0
    with atomic_path(output_path) as tmp:
        writer = None
        for batch in _read_batches(input_path):
            missing = [name for name in keep if name not in batch.schema.names]
            if missing:
                raise DataError(f"{input_path}: --keep columns {missing} are not in the file")
            frame = pa.Table.from_batches([batch]).to_pandas()
            try:
                scores = model.predict(frame)
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
