"""CSV/Parquet readers on the real samples in ../shared/data and on generated bad files."""

import csv

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from esmm.config import load_config
from esmm.data.sources import load_splits
from esmm.data.table import DataError, FieldKind, TableSchema, check_table
from esmm.data.tabular import read_table_file

ALI_CCP_FIELDS = {
    "1*": "single",
    "2*": "single",
    "3*": "single",
    "5*": "single",
    "7*": "single",
    "8*": "single",
    "D*": "dense",
}


def count_labels(path, conversion_column):
    with open(path) as handle:
        rows = list(csv.DictReader(handle))
    return (
        len(rows),
        sum(int(r["click"]) for r in rows),
        sum(int(r[conversion_column]) for r in rows),
    )


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_ali_ccp_sample_loads_with_right_counts(shared_data, split):
    path = shared_data / "ali-ccp-sample" / f"ali_ccp_{split}_sample.csv"
    table, schema = read_table_file(path, columns={"conversion": "purchase"}, fields=ALI_CCP_FIELDS)
    rows, clicks, conversions = count_labels(path, "purchase")
    assert table.num_rows == rows
    assert pc.sum(table["click"]).as_py() == clicks
    assert pc.sum(table["conversion"]).as_py() == conversions
    assert len(schema.names(FieldKind.SINGLE)) == 23  # all 23 Ali-CCP fields
    assert len(schema.names(FieldKind.DENSE)) == 8
    check_table(table, schema, str(path))


@pytest.mark.parametrize(
    ("folder", "files"),
    [
        ("aliexpress-sample", ["aliexpress_train_sample.csv", "aliexpress_test_sample.csv"]),
        ("aliexpress-fuxictr", ["train.csv", "test.csv"]),
    ],
)
def test_aliexpress_samples_load_with_right_counts(shared_data, folder, files):
    for name in files:
        path = shared_data / folder / name
        table, schema = read_table_file(
            path, fields={"search_id": "single", "categorical_*": "single", "numerical_*": "dense"}
        )
        rows, clicks, conversions = count_labels(path, "conversion")
        assert (
            table.num_rows,
            pc.sum(table["click"]).as_py(),
            pc.sum(table["conversion"]).as_py(),
        ) == (rows, clicks, conversions)
        assert len(schema.names(FieldKind.SINGLE)) == 17
        assert len(schema.names(FieldKind.DENSE)) == 63
        check_table(table, schema, str(path))


def test_real_bad_labels_sample_fails_conversion_requires_click(shared_data):
    path = shared_data / "ali-ccp-aitm-bad-labels" / "train.csv"
    table, schema = read_table_file(
        path, columns={"conversion": "purchase"}, fields={"[0-9]*": "single"}
    )
    with open(path) as handle:
        rows = list(csv.DictReader(handle))
    orphans = [i for i, r in enumerate(rows) if r["purchase"] == "1" and r["click"] == "0"]
    assert orphans
    with pytest.raises(DataError) as error:
        check_table(table, schema, str(path))
    message = str(error.value)
    assert str(path) in message
    assert f"{len(orphans)} rows have conversion=1 with click=0" in message
    assert str(orphans[:5]) in message


def test_by_file_splits_from_config(shared_data):
    folder = shared_data / "aliexpress-fuxictr"
    config = load_config(
        None,
        [
            "data.source=table",
            f"data.files={{train: [{folder / 'train.csv'}], test: [{folder / 'test.csv'}]}}",
            "data.fields={'categorical_*': single, 'numerical_*': dense}",
            "split.val_fraction=0.2",
        ],
    )
    splits, schema = load_splits(config)
    assert splits["train"].num_rows == 800 and splits["val"].num_rows == 200
    assert splits["test"].num_rows == 1000
    assert set(np.unique(splits["test"]["day"].to_numpy())) == {2}
    assert schema.names(FieldKind.SINGLE)[0] == "categorical_1"


def write_csv(path, header, rows):
    path.write_text("\n".join([",".join(header), *(",".join(map(str, r)) for r in rows)]) + "\n")
    return path


FIELDS = {"user": "single", "price": "dense"}


def test_missing_file_empty_file_and_missing_columns(tmp_path):
    with pytest.raises(DataError, match="nope.csv: file not found"):
        read_table_file(tmp_path / "nope.csv", fields=FIELDS)
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match="empty.csv: the file is empty"):
        read_table_file(tmp_path / "empty.csv", fields=FIELDS)
    path = write_csv(tmp_path / "a.csv", ["click", "purchase", "user", "price"], [[0, 0, 1, 1.0]])
    with pytest.raises(DataError, match=r"a.csv: missing label columns \['conversion'\]"):
        read_table_file(path, fields=FIELDS)
    with pytest.raises(DataError, match=r"field 'usr' matches no column"):
        read_table_file(path, columns={"conversion": "purchase"}, fields={"usr": "single"})


def test_bad_labels_nan_features_and_empty_table_are_named(tmp_path):
    header = ["click", "conversion", "user", "price"]
    schema = TableSchema.of(FIELDS)
    path = write_csv(
        tmp_path / "labels.csv", header, [[2, 0, 1, 1.0], [1, 0, 2, 2.0], [0, 1, 3, 1.0]]
    )
    table, _ = read_table_file(path, fields=FIELDS)
    with pytest.raises(DataError, match=r"labels.csv: column 'click': 1 values outside \{0,1\}"):
        check_table(table, schema, str(path))
    path = write_csv(
        tmp_path / "nan.csv", header, [[0, 0, 1, "nan"], [1, 0, 2, ""], [1, 1, 3, 2.0]]
    )
    table, _ = read_table_file(path, fields=FIELDS)
    with pytest.raises(DataError, match=r"nan.csv: column 'price': 2 null/NaN values"):
        check_table(table, schema, str(path))
    empty = pa.table({"click": pa.array([], pa.int8()), "conversion": pa.array([], pa.int8())})
    with pytest.raises(DataError, match="x.parquet: the table is empty"):
        check_table(empty, schema, "x.parquet")


def test_multi_valued_csv_column_becomes_a_list(tmp_path):
    path = write_csv(
        tmp_path / "m.csv", ["click", "conversion", "tags"], [[1, 0, "3|4|5"], [0, 0, "7"]]
    )
    table, schema = read_table_file(path, fields={"tags": "multi"})
    assert table["tags"].to_pylist() == [["3", "4", "5"], ["7"]]
    check_table(table, schema, str(path))
