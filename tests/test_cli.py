"""The command line end to end on a small simulated table, and its answers to bad input."""

import json

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from esmm.cli import app

runner = CliRunner()


def write_config(tmp_path, text: str):
    path = tmp_path / "config.yaml"
    path.write_text(f"output_dir: {tmp_path / 'out'}\n" + text)
    return path


SMALL_SIMULATION = """
data:
  source: simulator
  simulator: {rows: 60000, days: 4, seed: 1}
model: {embedding_dim: 8, tower_dims: [64, 32]}
train: {epochs: 3, batch_size: 512, learning_rate: 0.005}
"""


def invoke(*args):
    return runner.invoke(app, [*map(str, args)], catch_exceptions=False)


@pytest.mark.slow
def test_run_end_to_end_writes_every_output_and_beats_a_constant(tmp_path):
    config = write_config(tmp_path, SMALL_SIMULATION)
    result = invoke("run", "-c", config, "-q")
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    for path in (
        "impressions.parquet",
        "prepared/train.parquet",
        "prepared/encoder/encoder.json",
        "prepared/manifest.json",
        "checkpoints/last.pt",
        "model/model.pt",
        "model/encoder/encoder.json",
        "metrics.json",
    ):
        assert (out / path).exists(), path
    report = json.loads((out / "metrics.json").read_text())
    metrics = report["metrics"]
    assert metrics["ctcvr_auc"] > 0.6  # a constant predictor scores 0.5
    assert metrics["cvr_auc_clicked"] > 0.55
    assert metrics["cvr_auc_entire_space"] > 0.55
    assert metrics["ctr_auc"] != metrics["cvr_auc_clicked"]
    for name in ("cvr_auc_clicked", "ctcvr_auc", "cvr_auc_entire_space"):
        assert name in result.output
    assert not list(out.rglob("*.tmp"))
    # Ground truth stays out of the features.
    encoder = json.loads((out / "prepared/encoder/encoder.json").read_text())
    names = [f["name"] for f in encoder["schema"]["fields"]]
    assert "true_cvr" not in names and "true_ctr" not in names


def test_help_explains_every_verb():
    result = invoke("--help")
    assert result.exit_code == 0
    for verb in ("simulate", "prepare", "train", "evaluate", "run"):
        assert verb in result.output


def test_simulate_writes_the_requested_table(tmp_path):
    config = write_config(tmp_path, SMALL_SIMULATION)
    result = invoke("simulate", "-c", config, "--rows", 5000, "--days", 3, "-q")
    assert result.exit_code == 0, result.output
    table = pq.read_table(tmp_path / "out" / "impressions.parquet")
    assert table.num_rows == 5000
    assert sorted(set(table["day"].to_pylist())) == [0, 1, 2]


def test_bad_config_key_exits_2_with_key_named(tmp_path):
    config = write_config(tmp_path, "train: {epoch: 3}\n")
    result = invoke("prepare", "-c", config)
    assert result.exit_code == 2
    assert "train.epoch" in result.output


def test_prepare_before_simulate_says_what_to_do(tmp_path):
    result = invoke("prepare", "-c", write_config(tmp_path, SMALL_SIMULATION))
    assert result.exit_code == 1
    assert "run `esmm simulate` first" in result.output


def test_evaluate_without_a_model_is_a_clear_error(tmp_path):
    result = invoke("evaluate", "-c", write_config(tmp_path, SMALL_SIMULATION))
    assert result.exit_code == 1
    assert "no trained model" in result.output


BAD_ROWS = {
    "labels_of_2": (
        "click,conversion,user,price\n2,0,1,1.0\n0,0,2,2.0\n",
        "column 'click': 1 values outside {0,1}",
    ),
    "conversion_without_click": (
        "click,conversion,user,price\n0,1,1,1.0\n1,1,2,2.0\n",
        "1 rows have conversion=1 with click=0",
    ),
    "nan_in_feature": (
        "click,conversion,user,price\n0,0,1,nan\n1,0,2,2.0\n",
        "column 'price': 1 null/NaN values",
    ),
    "missing_column": ("click,conversion,user\n0,0,1\n1,0,2\n", "field 'price' matches no column"),
    "empty_table": ("click,conversion,user,price\n", "the table is empty"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_input_names_file_column_and_count_and_leaves_nothing(tmp_path, case):
    text, expected = BAD_ROWS[case]
    data = tmp_path / "impressions.csv"
    data.write_text(text)
    config = write_config(
        tmp_path,
        f"""
data:
  source: table
  path: {data}
  fields: {{user: single, price: dense}}
""",
    )
    result = invoke("prepare", "-c", config)
    assert result.exit_code == 1
    message = " ".join(result.output.split())  # undo rich's line wrapping
    assert str(data) in message or case == "missing_column"
    assert expected in message
    assert not (tmp_path / "out" / "prepared").exists()
    assert not list((tmp_path / "out").glob(".prepared*")) if (tmp_path / "out").exists() else True


def test_missing_input_file_is_named(tmp_path):
    config = write_config(
        tmp_path,
        """
data: {source: table, path: /no/such/file.csv, fields: {user: single}}
""",
    )
    result = invoke("prepare", "-c", config)
    assert result.exit_code == 1
    assert "/no/such/file.csv: file not found" in result.output
