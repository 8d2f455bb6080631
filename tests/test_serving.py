"""The pyfunc model and batch scoring: raw rows in, the same scores as in-process scoring out;
bad input rejected with the column named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from trained_models import log_trained_model, train_small_model
from typer.testing import CliRunner

from esmm.cli import app
from esmm.data.table import DataError
from esmm.models import load_trained_model
from esmm.serving import score_table


@pytest.fixture(scope="module")
def logged_model(tmp_path_factory):
    """A small trained ESMM logged as a pyfunc model to a SQLite MLflow store."""
    config, test = train_small_model(tmp_path_factory.mktemp("serving"))
    model_uri, _ = log_trained_model(config, test)
    return config, model_uri, test


def test_pyfunc_scores_equal_in_process_scoring(logged_model):
    import mlflow.pyfunc

    config, model_uri, test = logged_model
    rows = test.slice(0, 300)
    served = mlflow.pyfunc.load_model(model_uri).predict(rows.to_pandas())
    model, encoder, _ = load_trained_model(config.output_path / "model")
    direct = score_table(model, encoder, rows)
    assert list(served.columns) == ["pctr", "pcvr", "pctcvr"]
    np.testing.assert_allclose(served.to_numpy(), direct.to_numpy(), rtol=1e-6)
    assert ((served >= 0) & (served <= 1)).all().all()


def test_signature_names_every_raw_field(logged_model):
    from mlflow.models import get_model_info

    config, model_uri, _ = logged_model
    inputs = {spec.name: str(spec.type) for spec in get_model_info(model_uri).signature.inputs}
    _, encoder, _ = load_trained_model(config.output_path / "model")
    assert set(inputs) == set(encoder.schema.names())
    assert inputs["user_interest_categories"].startswith("Array(long")  # multi-valued ids
    assert inputs["user_id"].endswith("long") and inputs["item_price_log"].endswith("double")


def run_predict(config, model_uri: str, source: Path, output: Path, *extra: str):
    """`esmm predict` on ``source`` against the config's MLflow store."""
    tracking = ["--tracking-uri", config.tracking.tracking_uri]
    paths = ["--input", str(source), "--output", str(output)]
    return CliRunner().invoke(app, ["predict", "--model", model_uri, *paths, *tracking, *extra])


def test_predict_cli_writes_scores_in_input_order(logged_model, tmp_path):
    config, model_uri, test = logged_model
    source = tmp_path / "rows.parquet"
    pq.write_table(test.slice(0, 500), source)
    output = tmp_path / "scores.parquet"
    result = run_predict(config, model_uri, source, output, "--keep", "day")
    assert result.exit_code == 0, result.output
    scores = pq.read_table(output)
    assert scores.column_names == ["day", "pctr", "pcvr", "pctcvr"]
    model, encoder, _ = load_trained_model(config.output_path / "model")
    direct = score_table(model, encoder, test.slice(0, 500))
    np.testing.assert_allclose(scores["pcvr"].to_numpy(), direct["pcvr"].to_numpy(), rtol=1e-6)


def test_predict_rejects_a_missing_column_and_leaves_no_output(logged_model, tmp_path):
    config, model_uri, test = logged_model
    source = tmp_path / "rows.parquet"
    pq.write_table(test.slice(0, 50).drop_columns(["item_id"]), source)
    output = tmp_path / "scores.parquet"
    result = run_predict(config, model_uri, source, output)
    assert result.exit_code == 1
    assert "item_id" in result.output
    assert not output.exists()
    assert not list(Path(tmp_path).glob("*.tmp*"))


def test_score_table_names_a_column_of_the_wrong_type(logged_model):
    config, _, test = logged_model
    model, encoder, _ = load_trained_model(config.output_path / "model")
    rows = test.slice(0, 10)
    broken = rows.set_column(
        rows.schema.get_field_index("user_id"), "user_id", pa.array([[1]] * rows.num_rows)
    )
    with pytest.raises(DataError, match="user_id"):
        score_table(model, encoder, broken)
