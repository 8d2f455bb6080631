"""Encoders: fitted on train only, unseen values to the out-of-vocabulary id, saved and reused."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from esmm.data.encode import OOV_ID, FeatureEncoder
from esmm.data.table import DataError, TableSchema

SCHEMA = TableSchema.of(
    {"user": "single", "city": "single", "tags": "multi", "price": "dense"},
    allow_missing=["city"],
)


def make_table(users, cities, tags, prices):
    n = len(users)
    return pa.table(
        {
            "user": pa.array(users, pa.int64()),
            "city": pa.array(cities, pa.string()),
            "tags": pa.array(tags, pa.list_(pa.int64())),
            "price": pa.array(prices, pa.float64()),
            "click": [0] * n,
            "conversion": [0] * n,
        }
    )


TRAIN = make_table(
    [10, 10, 20, 30, 30, 30],
    ["a", "b", "a", None, "a", "c"],
    [[1], [1, 2], [], [2, 2], [3], [1]],
    [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
)


def test_vocabulary_from_train_only_with_min_count():
    encoder = FeatureEncoder.fit(TRAIN, SCHEMA, min_count=2)
    assert encoder.vocabularies["user"].to_pylist() == [10, 30]  # 20 seen once: rare
    assert encoder.vocabularies["city"].to_pylist() == ["a"]
    assert encoder.vocabularies["tags"].to_pylist() == [1, 2]
    assert encoder.cardinalities == {"user": 3, "city": 2, "tags": 3}


def test_unseen_rare_and_missing_values_map_to_oov():
    encoder = FeatureEncoder.fit(TRAIN, SCHEMA, min_count=2)
    test = make_table([10, 20, 99], ["a", None, "zzz"], [[1, 7], [], [3]], [0.0, 3.5, 7.0])
    features = encoder.transform(test)
    assert features.single_ids[:, 0].tolist() == [1, OOV_ID, OOV_ID]
    assert features.single_ids[:, 1].tolist() == [1, OOV_ID, OOV_ID]
    assert features.multi_values[0].tolist() == [1, OOV_ID, OOV_ID]
    assert features.multi_offsets[0].tolist() == [0, 2, 2, 3]
    mean, std = np.mean([1, 2, 3, 4, 5, 6]), np.std([1, 2, 3, 4, 5, 6])
    np.testing.assert_allclose(
        features.dense[:, 0].numpy(), (np.array([0, 3.5, 7]) - mean) / std, rtol=1e-6
    )


def test_integer_ids_read_from_csv_as_other_int_type_still_match():
    encoder = FeatureEncoder.fit(TRAIN, SCHEMA, min_count=1)
    test = TRAIN.set_column(0, "user", TRAIN["user"].cast(pa.int32()))
    torch.testing.assert_close(
        encoder.transform(test).single_ids, encoder.transform(TRAIN).single_ids
    )


def test_incompatible_type_is_a_clear_error():
    encoder = FeatureEncoder.fit(TRAIN, SCHEMA, min_count=1)
    test = TRAIN.set_column(0, "user", pa.array(["x"] * 6))
    with pytest.raises(DataError, match="column 'user'"):
        encoder.transform(test)


def test_save_and_load_give_identical_encoding(tmp_path):
    encoder = FeatureEncoder.fit(TRAIN, SCHEMA, min_count=1)
    encoder.save(tmp_path / "encoder")
    loaded = FeatureEncoder.load(tmp_path / "encoder")
    a, b = encoder.transform(TRAIN), loaded.transform(TRAIN)
    torch.testing.assert_close(a.single_ids, b.single_ids)
    torch.testing.assert_close(a.dense, b.dense)
    torch.testing.assert_close(a.multi_values[0], b.multi_values[0])
    assert loaded.schema == SCHEMA
    assert not list(tmp_path.glob(".encoder*"))  # no staging folder left behind


def test_take_and_slice_gather_ragged_rows_exactly():
    encoder = FeatureEncoder.fit(TRAIN, SCHEMA, min_count=1)
    features = encoder.transform(TRAIN)
    rows = torch.tensor([5, 0, 3, 2, 3])
    batch = features.take(rows)
    expected_lists = [[1], [1], [2, 2], [], [2, 2]]
    offsets = batch.multi_offsets[0].tolist()
    values = batch.multi_values[0].tolist()
    got = [values[offsets[i] : offsets[i + 1]] for i in range(len(rows))]
    assert got == expected_lists
    torch.testing.assert_close(batch.single_ids, features.single_ids[rows])
    window = features.slice(1, 4)
    assert window.multi_offsets[0].tolist() == [0, 2, 2, 4]
    assert window.multi_values[0].tolist() == [1, 2, 2, 2]
