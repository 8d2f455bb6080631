"""Each data source reaches training through the config: raw Ali-CCP files and PaddleRec text."""

import json

import numpy as np
import pyarrow as pa
from typer.testing import CliRunner

from esmm.cli import app
from esmm.config import load_config
from esmm.data.aliccp import ALICCP_FIELDS, ALICCP_MULTI_FIELDS, write_aliccp_raw
from esmm.data.sources import load_splits


def aliccp_like_table(n: int, seed: int) -> pa.Table:
    """All 23 Ali-CCP fields; clicks follow the item id (205), conversions the user id (101)."""
    rng = np.random.default_rng(seed)
    columns = {"sample_id": pa.array(np.arange(n) + seed * n)}
    for name in ALICCP_FIELDS:
        if name in ALICCP_MULTI_FIELDS:
            lengths = rng.integers(0, 4, n)
            offsets = np.r_[0, np.cumsum(lengths)].astype(np.int32)
            columns[name] = pa.ListArray.from_arrays(
                offsets, pa.array(rng.integers(1, 200, offsets[-1]))
            )
        else:
            columns[name] = pa.array(rng.integers(1, 60, n))
    columns["101"] = pa.array(rng.integers(1, 11, n))  # few users: learnable from few clicks
    item, user = columns["205"].to_numpy(), columns["101"].to_numpy()
    click = rng.random(n) < np.where(item % 4 == 0, 0.5, 0.05)
    conversion = click & (rng.random(n) < np.where(user % 2 == 0, 0.5, 0.05))
    columns["click"] = pa.array(click.astype(np.int8))
    columns["conversion"] = pa.array(conversion.astype(np.int8))
    return pa.table(columns)


def test_raw_aliccp_files_train_end_to_end(tmp_path):
    files = {}
    for split, seed in (("train", 0), ("test", 1)):
        skeleton, common = tmp_path / f"skeleton_{split}.csv", tmp_path / f"common_{split}.csv"
        write_aliccp_raw(aliccp_like_table(6000, seed), skeleton, common)
        files[split] = f"[{skeleton}, {common}]"
    config = tmp_path / "aliccp.yaml"
    config.write_text(
        f"output_dir: {tmp_path / 'out'}\n"
        f"data: {{source: aliccp_raw, files: {{train: {files['train']}, test: {files['test']}}}}}\n"
        "split: {val_fraction: 0.2}\n"
        "encode: {min_count: 1}\n"
        "model: {embedding_dim: 8, tower_dims: [32]}\n"
        "train: {epochs: 6, batch_size: 256, learning_rate: 0.01, patience: 6}\n"
    )
    result = CliRunner().invoke(app, ["run", "-c", str(config), "-q"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "out" / "prepared" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["rows"] == 4800
    assert manifest["splits"]["val"]["rows"] == 1200
    assert manifest["splits"]["test"]["rows"] == 6000
    assert len(manifest["schema"]["fields"]) == 23
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())["metrics"]
    assert metrics["ctr_auc"] > 0.7
    assert metrics["cvr_auc_clicked"] > 0.6


def test_paddlerec_samples_load_through_the_config(shared_data):
    folder = shared_data / "ali-ccp-paddlerec"
    config = load_config(
        None,
        [
            "data.source=paddlerec",
            f"data.files={{train: [{folder}/train_small.txt], test: [{folder}/test_small.txt]}}",
            "split.val_fraction=0.2",
        ],
    )
    splits, schema = load_splits(config)
    assert (splits["train"].num_rows, splits["val"].num_rows, splits["test"].num_rows) == (8, 2, 10)
    assert len(schema.fields) == 23
    assert set(splits["test"]["day"].to_pylist()) == {2}


def test_append_day_and_window_keep_the_latest_days(tmp_path):
    """A scheduled run sees a new daily partition and trains on the latest window of days."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from esmm.data.simulate import simulate_impressions
    from esmm.data.sources import source_fingerprint

    base = ["data.simulator.rows=4000", "data.simulator.days=4", f"output_dir={tmp_path}"]
    sets = [arg for override in base for arg in ("--set", override)]
    runner = CliRunner()
    assert runner.invoke(app, ["simulate", *sets]).exit_code == 0
    config = load_config(None, base)
    before = source_fingerprint(config)
    appended = runner.invoke(app, ["simulate", "--append-day", *sets])
    assert appended.exit_code == 0, appended.output
    table = pq.read_table(tmp_path / "impressions.parquet")
    assert sorted(set(table["day"].to_pylist())) == [0, 1, 2, 3, 4]
    assert table.num_rows == 5000
    # the new day continues the same simulated world: day 4 of a 5-day simulation
    full = simulate_impressions(5000, n_days=5, seed=0)
    assert table.slice(4000).equals(full.filter(pc.equal(full["day"], 4)))
    assert source_fingerprint(config) != before

    windowed = load_config(None, [*base, "data.window_days=4"])
    splits, _ = load_splits(windowed)
    days = {name: sorted(set(t["day"].to_pylist())) for name, t in splits.items()}
    assert days == {"train": [1], "val": [2], "test": [3, 4]}
