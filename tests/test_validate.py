"""The Great Expectations suite: good data passes, each kind of bad data fails with the
expectation and the column named, reports are written either way, and the CLI exits 0 or 1."""

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from esmm.cli import app
from esmm.config import ValidateSettings, load_config
from esmm.data.simulate import simulate_impressions, simulator_schema
from esmm.data.table import DataError
from esmm.validate import DataValidationFailed, validate_stage, validate_table

ROWS = 20_000
SETTINGS = ValidateSettings(
    min_rows=1000,
    ctr_range=(0.01, 0.3),
    cvr_per_click_range=(0.02, 0.4),
    min_days=3,
    data_docs=False,
)


@pytest.fixture(scope="module")
def impressions() -> pa.Table:
    """Four days of the default preset: about 8% clicks and 12% conversions per click."""
    return simulate_impressions(ROWS, preset="default", n_days=4, seed=0, progress=False)


def replace_column(table: pa.Table, name: str, values) -> pa.Table:
    return table.set_column(table.column_names.index(name), name, values)


def config_for(tmp_path, table: pa.Table, *overrides: str):
    """A simulator-source config reading ``table`` from a Parquet file under ``tmp_path``."""
    path = tmp_path / "impressions.parquet"
    pq.write_table(table, path)
    return load_config(
        None,
        [
            f"output_dir={tmp_path / 'out'}",
            f"data.path={path}",
            "validation.min_rows=1000",
            "validation.ctr_range=[0.01, 0.3]",
            "validation.cvr_per_click_range=[0.02, 0.4]",
            "validation.min_days=3",
            "validation.data_docs=false",
            *overrides,
        ],
    )


def failure_message(tmp_path, table: pa.Table, *overrides: str) -> str:
    with pytest.raises(DataValidationFailed) as failure:
        validate_stage(config_for(tmp_path, table, *overrides))
    assert isinstance(failure.value, DataError)  # the CLI's clear-error path handles it
    return str(failure.value)


def test_simulated_table_passes_every_expectation(impressions):
    report = validate_table(impressions, simulator_schema(), SETTINGS, "simulated")
    assert report.success, [outcome.describe() for outcome in report.failed()]
    assert report.rows == ROWS
    checked = {(o.expectation, o.columns) for o in report.results}
    for name in ("click", "conversion", "day", *simulator_schema().names()):
        assert ("expect_column_to_exist", (name,)) in checked
    assert ("expect_column_values_to_be_in_set", ("click",)) in checked
    assert ("expect_column_mean_to_be_between", ("conversion_per_click",)) in checked
    assert (
        "expect_column_values_to_be_between",
        ("user_interest_categories.min_id",),
    ) in checked
    means = {o.columns[0]: o.observed_value for o in report.results if "mean" in o.expectation}
    assert 0.05 < means["click"] < 0.12 and 0.08 < means["conversion_per_click"] < 0.16
    assert report.summary_markdown().count("| pass |") == len(report.results)


def drop_item_id(table: pa.Table) -> pa.Table:
    return table.drop_columns(["item_id"])


def label_two(table: pa.Table) -> pa.Table:
    click = table["click"].to_numpy().copy()
    click[:3] = 2
    return replace_column(table, "click", pa.array(click))


def conversion_without_click(table: pa.Table) -> pa.Table:
    conversion = table["conversion"].to_numpy().copy()
    conversion[np.flatnonzero(table["click"].to_numpy() == 0)[:4]] = 1
    return replace_column(table, "conversion", pa.array(conversion))


def null_user_ids(table: pa.Table) -> pa.Table:
    user = table["user_id"].to_numpy()
    mask = np.zeros(table.num_rows, dtype=bool)
    mask[[5, 7]] = True
    return replace_column(table, "user_id", pa.array(user, mask=mask))


def everything_clicked(table: pa.Table) -> pa.Table:
    return replace_column(table, "click", pa.array(np.ones(table.num_rows, dtype=np.int8)))


def day_two_missing(table: pa.Table) -> pa.Table:
    return table.filter(pc.not_equal(table["day"], 2))


def bad_id_lists(table: pa.Table) -> pa.Table:
    ids = table["user_interest_categories"].to_pylist()
    ids[0], ids[1], ids[2] = [1, None], None, [-5, 3]
    return replace_column(table, "user_interest_categories", pa.array(ids, pa.list_(pa.int64())))


def click_as_text(table: pa.Table) -> pa.Table:
    return replace_column(table, "click", pc.cast(table["click"], pa.string()))


@pytest.mark.parametrize(
    ("corrupt", "expected"),
    [
        (drop_item_id, ["expect_column_to_exist(item_id): column not in the table"]),
        (
            label_two,
            ["expect_column_values_to_be_in_set(click): 3 of 20,000 rows unexpected (e.g. [2])"],
        ),
        (
            conversion_without_click,
            ["expect_column_pair_values_a_to_be_greater_than_b(click, conversion): 4 of 20,000"],
        ),
        (null_user_ids, ["expect_column_values_to_not_be_null(user_id): 2 of 20,000"]),
        (everything_clicked, ["expect_column_mean_to_be_between(click): observed 1;"]),
        (day_two_missing, ["expect_column_distinct_values_to_contain_set(day): missing [2]"]),
        (
            bad_id_lists,
            [
                "expect_column_values_to_not_be_null(user_interest_categories.length): 2 of",
                "expect_column_values_to_be_between(user_interest_categories.min_id): 1 of",
            ],
        ),
        (
            click_as_text,
            [
                "expect_column_values_to_be_in_type_list(click): observed str",
                "expect_column_mean_to_be_between(click): not evaluated",
            ],
        ),
    ],
)
def test_bad_data_fails_naming_expectation_and_column(tmp_path, impressions, corrupt, expected):
    message = failure_message(tmp_path, corrupt(impressions))
    assert message.startswith(str(tmp_path / "impressions.parquet"))
    for line in expected:
        assert line in message


def test_a_missing_column_leaves_its_other_checks_not_evaluated(impressions):
    report = validate_table(drop_item_id(impressions), simulator_schema(), SETTINGS, "t")
    on_item_id = [o for o in report.failed() if o.columns == ("item_id",)]
    assert {o.status for o in on_item_id} == {"FAIL", "not evaluated"}
    assert all("column 'item_id' not in the table" in o.error for o in on_item_id if o.error)
    assert {o.columns for o in report.failed()} == {("item_id",)}


def test_nulls_pass_where_allow_missing_lists_the_field(tmp_path, impressions):
    report = validate_stage(
        config_for(tmp_path, null_user_ids(impressions), "data.allow_missing=[user_id]")
    )
    assert report.success


def test_configured_days_must_match_exactly(tmp_path, impressions):
    message = failure_message(tmp_path, impressions, "validation.days=[0, 1, 2, 3, 4]")
    assert "expect_column_distinct_values_to_equal_set(day): missing [4]" in message


def test_report_folder_written_on_success_and_on_failure(tmp_path, impressions):
    report = validate_stage(config_for(tmp_path, impressions, "validation.data_docs=true"))
    folder = tmp_path / "out" / "validation"
    assert report.folder == folder
    written = json.loads((folder / "report.json").read_text())
    assert written["summary"]["success"] is True
    assert written["great_expectations"]["success"] is True
    assert len(written["great_expectations"]["results"]) == len(report.results)
    assert "# Data validation: PASSED" in (folder / "summary.md").read_text()
    assert report.data_docs == folder / "data_docs" / "index.html"
    assert report.data_docs.exists()
    assert list((folder / "data_docs" / "validations").rglob("*.html"))

    failure_message(tmp_path, label_two(impressions))
    written = json.loads((folder / "report.json").read_text())
    assert written["summary"]["success"] is False
    assert written["summary"]["failed"] == [
        "expect_column_values_to_be_in_set(click): 3 of 20,000 rows unexpected (e.g. [2])"
    ]
    summary = (folder / "summary.md").read_text()
    assert "| FAIL | expect_column_values_to_be_in_set | click | 3 / 20,000 | e.g. [2] |" in summary
    assert not (folder / "data_docs").exists()  # this run had data_docs off: nothing stale
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".validation")]


def test_data_docs_with_a_relative_output_dir(tmp_path, impressions, monkeypatch):
    """The default output_dir (runs/default) is relative; GX's site store needs absolute paths."""
    monkeypatch.chdir(tmp_path)
    config = config_for(tmp_path, impressions, "validation.data_docs=true", "output_dir=out")
    report = validate_stage(config)
    assert report.data_docs == Path("out/validation/data_docs/index.html")
    assert report.data_docs.exists()


def write_cli_config(tmp_path, table: pa.Table):
    data = tmp_path / "impressions.parquet"
    pq.write_table(table, data)
    config = tmp_path / "config.yaml"
    config.write_text(
        f"output_dir: {tmp_path / 'out'}\n"
        f"data: {{source: simulator, path: {data}}}\n"
        "validation: {min_rows: 1000, ctr_range: [0.01, 0.3], min_days: 3, data_docs: false}\n"
    )
    return config


def test_cli_exits_0_on_good_data_and_1_naming_failures(tmp_path, impressions):
    runner = CliRunner()
    good = runner.invoke(app, ["validate", "-c", str(write_cli_config(tmp_path, impressions))])
    assert good.exit_code == 0, good.output
    assert "passed" in good.output

    bad = write_cli_config(tmp_path, conversion_without_click(label_two(impressions)))
    result = runner.invoke(app, ["validate", "-c", str(bad)])
    assert result.exit_code == 1
    message = " ".join(result.output.split())  # undo rich's line wrapping
    assert "DataValidationFailed" in message
    assert "expect_column_values_to_be_in_set(click): 3 of 20,000 rows unexpected" in message
    assert "expect_column_pair_values_a_to_be_greater_than_b(click, conversion)" in message
    assert str(tmp_path / "out" / "validation") in message


def real_sample_config(tmp_path, shared_data, folder: str, files: dict, *overrides: str):
    listed = ", ".join(
        f"{split}: [{', '.join(str(shared_data / folder / n) for n in names)}]"
        for split, names in files.items()
    )
    return load_config(
        None,
        [
            f"output_dir={tmp_path}",
            "data.source=table",
            f"data.files={{{listed}}}",
            "validation.data_docs=false",
            *overrides,
        ],
    )


ALIEXPRESS_FIELDS = "data.fields={'categorical_*': single, 'numerical_*': dense}"
ALI_CCP_FIELDS = "data.fields={'[1-8]*': single, 'D*': dense}"


def test_real_aliexpress_and_ali_ccp_samples_pass(tmp_path, shared_data):
    # Files per split carry no day column: the reader numbers them by split (train 0, val 1,
    # test 2), and the suite expects exactly those numbers.
    aliexpress = real_sample_config(
        tmp_path / "fuxictr",
        shared_data,
        "aliexpress-fuxictr",
        {"train": ["train.csv"], "test": ["test.csv"]},
        ALIEXPRESS_FIELDS,
    )
    report = validate_stage(aliexpress)
    assert report.success and report.rows == 2000
    ali_ccp = real_sample_config(
        tmp_path / "ali-ccp",
        shared_data,
        "ali-ccp-sample",
        {
            "train": ["ali_ccp_train_sample.csv"],
            "val": ["ali_ccp_val_sample.csv"],
            "test": ["ali_ccp_test_sample.csv"],
        },
        "data.columns={conversion: purchase}",
        ALI_CCP_FIELDS,
        "validation.min_rows=100",  # a 200-row sample
    )
    report = validate_stage(ali_ccp)
    assert report.success and report.rows == 200


def test_real_paddlerec_sample_with_multi_valued_fields_passes(tmp_path, shared_data):
    folder = shared_data / "ali-ccp-paddlerec"
    config = load_config(
        None,
        [
            f"output_dir={tmp_path}",
            "data.source=paddlerec",
            f"data.files={{train: [{folder}/train_small.txt], test: [{folder}/test_small.txt]}}",
            "validation.min_rows=10",  # 20 rows in all
            "validation.data_docs=false",
        ],
    )
    report = validate_stage(config)
    assert report.success and report.rows == 20
    checked = {o.columns[0] for o in report.results if o.columns}
    assert {"150_14.length", "150_14.min_id"} <= checked


def test_real_aliexpress_small_sample_fails_on_its_click_rate(tmp_path, shared_data):
    # This sample is click-enriched (70 clicks in 120 impressions): above the 50% ceiling.
    config = real_sample_config(
        tmp_path,
        shared_data,
        "aliexpress-sample",
        {"train": ["aliexpress_train_sample.csv"], "test": ["aliexpress_test_sample.csv"]},
        ALIEXPRESS_FIELDS,
        "validation.min_rows=100",
    )
    with pytest.raises(DataValidationFailed) as failure:
        validate_stage(config)
    assert [o.describe() for o in failure.value.report.failed()] == [
        "expect_column_mean_to_be_between(click): observed 0.5833; "
        "expected min_value=0.005, max_value=0.5"
    ]


def test_real_bad_labels_sample_fails_conversion_requires_click(tmp_path, shared_data):
    path = shared_data / "ali-ccp-aitm-bad-labels" / "train.csv"
    with open(path) as handle:
        rows = list(csv.DictReader(handle))
    orphans = [r for r in rows if r["purchase"] == "1" and r["click"] == "0"]
    config = real_sample_config(
        tmp_path,
        shared_data,
        "ali-ccp-aitm-bad-labels",
        {"train": ["train.csv"]},
        "data.columns={conversion: purchase}",
        "data.fields={'[0-9]*': single}",
        "validation.min_rows=10",  # a 48-row sample
    )
    with pytest.raises(DataValidationFailed) as failure:
        validate_stage(config)
    message = str(failure.value)
    assert message.startswith(str(path))
    assert (
        "expect_column_pair_values_a_to_be_greater_than_b(click, conversion): "
        f"{len(orphans)} of {len(rows)} rows unexpected (e.g. [[0, 1]])"
    ) in message
    assert len(failure.value.report.failed()) == 1
