"""Scoring precision: bfloat16 is opt-in, close to float32, float32-valued, refused where it
cannot be honoured, and float32 where the CPU lacks bfloat16."""

from __future__ import annotations

import logging

import numpy as np
import pyarrow.parquet as pq
import pytest
from trained_models import log_trained_model, train_small_model
from typer.testing import CliRunner

import esmm.serving
import esmm.train
from esmm.cli import app
from esmm.models import load_trained_model
from esmm.serving import score_table
from esmm.train import predict

TOLERANCE = 5e-3  # bfloat16 keeps 8 significant bits; measured differences are far smaller


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small trained ESMM, logged twice to a SQLite MLflow store: as logged now, and as
    logged before the precision parameter existed."""
    from mlflow.models import ModelSignature

    config, test = train_small_model(
        tmp_path_factory.mktemp("precision"), "data.simulator.rows=6000"
    )
    model_uri, _ = log_trained_model(config, test)

    current = esmm.serving.model_signature

    def without_params(encoder, example):
        signature = current(encoder, example)
        return ModelSignature(inputs=signature.inputs, outputs=signature.outputs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(esmm.serving, "model_signature", without_params)
        old_uri, _ = log_trained_model(config, test)
    model, encoder, _ = load_trained_model(config.output_path / "model")
    return config, model, encoder, test, model_uri, old_uri


def test_bfloat16_scores_are_float32_arrays_close_to_float32(trained):
    _, model, encoder, test, _, _ = trained
    features = encoder.transform(test)
    pctr32, pcvr32 = predict(model, features, 512)
    model.train()
    pctr16, pcvr16 = predict(model, features, 512, precision="bfloat16")
    assert model.training  # predict restores the mode it found
    model.eval()
    assert pcvr16.dtype == np.float32 and pctr16.dtype == np.float32
    np.testing.assert_allclose(pcvr16, pcvr32, atol=TOLERANCE)
    np.testing.assert_allclose(pctr16, pctr32, atol=TOLERANCE)


def test_an_unknown_precision_is_refused(trained):
    _, model, encoder, test, _, _ = trained
    with pytest.raises(ValueError, match="float16"):
        predict(model, encoder.transform(test.slice(0, 10)), precision="float16")


def test_without_cpu_bfloat16_scoring_stays_float32_and_says_so(trained, monkeypatch, caplog):
    _, model, encoder, test, _, _ = trained
    features = encoder.transform(test.slice(0, 300))
    monkeypatch.setattr(esmm.train, "bfloat16_matmul_supported", lambda: False)
    esmm.train._bfloat16_available.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="esmm.train"):
            _, pcvr16 = predict(model, features, precision="bfloat16")
    finally:
        esmm.train._bfloat16_available.cache_clear()
    _, pcvr32 = predict(model, features)
    np.testing.assert_array_equal(pcvr16, pcvr32)
    assert "float32" in caplog.text and "bfloat16" in caplog.text


def invoke_predict(config, model_uri, source, output, *extra):
    return CliRunner().invoke(
        app,
        [
            *("predict", "--model", model_uri, "--input", str(source), "--output", str(output)),
            *("--tracking-uri", config.tracking.tracking_uri, *extra),
        ],
    )


def test_predict_cli_scores_in_bfloat16(trained, tmp_path):
    config, model, encoder, test, model_uri, _ = trained
    source, output = tmp_path / "rows.parquet", tmp_path / "scores.parquet"
    pq.write_table(test.slice(0, 400), source)
    result = invoke_predict(config, model_uri, source, output, "--precision", "bfloat16")
    assert result.exit_code == 0, result.output
    direct = score_table(model, encoder, test.slice(0, 400))
    np.testing.assert_allclose(
        pq.read_table(output)["pcvr"].to_numpy(), direct["pcvr"].to_numpy(), atol=TOLERANCE
    )


def test_a_model_logged_without_the_parameter_refuses_bfloat16(trained, tmp_path):
    config, _, _, test, _, old_uri = trained
    source, output = tmp_path / "rows.parquet", tmp_path / "scores.parquet"
    pq.write_table(test.slice(0, 50), source)
    result = invoke_predict(config, old_uri, source, output, "--precision", "bfloat16")
    assert result.exit_code == 1
    assert "without the 'precision' parameter" in result.output
    assert not output.exists()
    assert invoke_predict(config, old_uri, source, output).exit_code == 0  # float32 still works
