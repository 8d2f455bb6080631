"""The impression simulator: determinism, day-by-day composition, target rates, the table
contract, and the structure the models must find (popularity, signal, selection bias)."""

import functools

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from esmm.data import simulate
from esmm.data.simulate import PRESETS, simulate_day, simulate_impressions, simulator_schema
from esmm.data.table import CLICK, CONVERSION, DAY, TRUTH_COLUMNS, check_table

RATE_ROWS = 200_000


@functools.cache
def simulated(preset: str) -> pa.Table:
    """One 200k-row table per preset, shared by the tests of this module."""
    return simulate_impressions(RATE_ROWS, preset=preset, seed=0)


@pytest.fixture
def default_table() -> pa.Table:
    return simulated("default")


def column(table: pa.Table, name: str) -> np.ndarray:
    return table[name].to_numpy()


def test_same_arguments_give_the_same_table_bit_for_bit():
    first = simulate_impressions(20_000, n_days=4, seed=3)
    simulate._world.cache_clear()  # rebuild the hidden world from the seed, not the cache
    second = simulate_impressions(20_000, n_days=4, seed=3)
    assert first.equals(second)
    other = simulate_impressions(20_000, n_days=4, seed=4)
    assert not first.equals(other)
    assert not np.array_equal(column(first, "item_id"), column(other, "item_id"))


def test_table_is_the_concatenation_of_its_days():
    whole = simulate_impressions(10_003, n_days=4, start_day=2, seed=1)
    # 10_003 = 4 * 2_500 + 3: the remainder goes one row each to the last three days.
    rows = [2_500, 2_501, 2_501, 2_501]
    days = [simulate_day(day, n, seed=1) for day, n in zip(range(2, 6), rows, strict=True)]
    assert whole.equals(pa.concat_tables(days))
    day_values, counts = np.unique(column(whole, DAY), return_counts=True)
    assert day_values.tolist() == [2, 3, 4, 5]
    assert counts.tolist() == rows


def test_an_appended_day_continues_the_same_world():
    old = simulate_impressions(40_000, n_days=8, seed=2)
    new = simulate_day(8, 5_000, seed=2)
    assert np.unique(column(new, DAY)).tolist() == [8]
    for key, attributes in (
        ("item_id", ["item_category", "item_shop", "item_brand", "item_price_log"]),
        ("user_id", ["user_age_bucket", "user_gender", "user_city_tier"]),
    ):
        both = np.intersect1d(column(old, key), column(new, key))
        assert both.size > 100
        for name in attributes:
            before = dict(zip(column(old, key), column(old, name), strict=True))
            after = dict(zip(column(new, key), column(new, name), strict=True))
            assert all(before[k] == after[k] for k in both), name
    # A new day is new impressions, not a copy of an old one.
    assert not np.array_equal(column(new, "item_id"), column(old, "item_id")[:5_000])


def test_unknown_preset_and_bad_row_counts_are_refused():
    with pytest.raises(ValueError, match=r"'nope'.*ali-ccp.*default"):
        simulate_impressions(1_000, preset="nope")
    with pytest.raises(ValueError, match="n_rows"):
        simulate_impressions(0)
    with pytest.raises(ValueError, match="n_rows"):
        simulate_day(0, -5)
    with pytest.raises(ValueError, match="n_days"):
        simulate_impressions(3, n_days=8)


def test_table_contract(default_table):
    schema = simulator_schema()
    check_table(default_table, schema, "sim")
    assert not set(TRUTH_COLUMNS) & set(schema.names())
    assert set(default_table.column_names) == {
        DAY,
        CLICK,
        CONVERSION,
        *TRUTH_COLUMNS,
        *schema.names(),
    }
    types = default_table.schema
    assert types.field(CLICK).type == pa.int8() == types.field(CONVERSION).type
    assert all(types.field(name).type == pa.float64() for name in TRUTH_COLUMNS)
    assert types.field("item_price_log").type == pa.float32()
    assert pa.types.is_integer(types.field(DAY).type)
    assert schema.names("dense") == ["item_price_log"]
    click, conversion = column(default_table, CLICK), column(default_table, CONVERSION)
    assert np.all(conversion <= click)
    for name in TRUTH_COLUMNS:
        truth = column(default_table, name)
        assert np.all((truth > 0) & (truth < 1)), name


def test_interest_categories_are_one_to_six_ids_per_user(default_table):
    interests = default_table["user_interest_categories"]
    assert interests.type == pa.list_(pa.int64())
    lengths = pc.list_value_length(interests).to_numpy()
    assert lengths.min() == 1 and lengths.max() == 6
    assert set(np.unique(lengths)) == set(range(1, 7))
    # The same user always carries the same, distinct, categories.
    users, first_rows = np.unique(column(default_table, "user_id"), return_index=True)
    by_user = dict(zip(users, interests.take(first_rows).to_pylist(), strict=True))
    sample = default_table.slice(0, 2_000)
    for user, ids in zip(
        column(sample, "user_id"), sample["user_interest_categories"].to_pylist(), strict=True
    ):
        assert ids == by_user[user]
        assert len(set(ids)) == len(ids)


@pytest.mark.parametrize(
    ("preset", "ctr", "cvr"), [("default", 0.08, 0.12), ("ali-ccp", 0.039, 0.0055)]
)
def test_rates_hit_the_preset_targets(preset, ctr, cvr):
    assert (PRESETS[preset].target_ctr, PRESETS[preset].target_cvr) == (ctr, cvr)
    table = simulated(preset)
    click = column(table, CLICK) == 1
    conversion = column(table, CONVERSION)
    assert click.mean() == pytest.approx(ctr, rel=0.05)
    # The expected conversions per click, without the noise of the few realised conversions.
    assert column(table, "true_cvr")[click].mean() == pytest.approx(cvr, rel=0.08)
    tolerance = 0.1 if cvr > 0.05 else 0.5  # ali-ccp: only ~40 conversions in 200k rows
    assert conversion[click].mean() == pytest.approx(cvr, rel=tolerance)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_selection_bias_clicked_impressions_convert_more(preset):
    table = simulated(preset)
    click = column(table, CLICK) == 1
    true_cvr = column(table, "true_cvr")
    assert true_cvr[click].mean() > 1.5 * true_cvr[~click].mean()


def test_item_and_user_popularity_is_zipf_like(default_table):
    preset = PRESETS["default"]
    for key, size in (("item_id", preset.n_items), ("user_id", preset.n_users)):
        counts = np.sort(np.bincount(column(default_table, key), minlength=size))[::-1]
        assert counts[0] > 20 * max(np.median(counts), 1), key
        top_percent = counts[: size // 100].sum() / counts.sum()
        assert top_percent > 0.1, key


def test_features_carry_signal_in_the_expected_directions(default_table):
    true_ctr, true_cvr = column(default_table, "true_ctr"), column(default_table, "true_cvr")
    position = column(default_table, "context_position")
    ctr_by_position = [true_ctr[position == slot].mean() for slot in range(1, 11)]
    assert np.all(np.diff(ctr_by_position) < 0)  # lower slots, fewer clicks
    assert ctr_by_position[0] > 1.5 * ctr_by_position[-1]

    bucket = column(default_table, "item_price_bucket")
    cvr_by_price = [true_cvr[bucket == b].mean() for b in range(10)]
    assert np.corrcoef(np.arange(10), cvr_by_price)[0, 1] < -0.9  # dearer, fewer conversions
    assert cvr_by_price[0] > 2 * cvr_by_price[-1]

    # Items of one of the user's interest categories: more clicks and more conversions.
    interests = default_table["user_interest_categories"]
    row = pc.list_parent_indices(interests).to_numpy()
    hit = pc.list_flatten(interests).to_numpy() == column(default_table, "item_category")[row]
    match = np.bincount(row[hit], minlength=default_table.num_rows) > 0
    assert 0.2 < match.mean() < 0.8
    assert true_ctr[match].mean() > 1.3 * true_ctr[~match].mean()
    assert true_cvr[match].mean() > 1.3 * true_cvr[~match].mean()


def test_progress_bar_does_not_change_the_table(capsys):
    quiet = simulate_impressions(5_000, n_days=2, seed=5)
    assert simulate_impressions(5_000, n_days=2, seed=5, progress=True).equals(quiet)
    assert capsys.readouterr().out == ""
