"""Ali-CCP readers and writer: round trips, every kind of bad line, the real PaddleRec samples."""

from __future__ import annotations

import csv
import json
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from esmm.data.aliccp import (
    ALICCP_FIELDS,
    ALICCP_MULTI_FIELDS,
    ALICCP_USER_FIELDS,
    REPORT_METADATA_KEY,
    AliccpReadReport,
    aliccp_schema,
    convert_aliccp_raw,
    read_aliccp_raw,
    read_paddlerec,
    write_aliccp_raw,
)
from esmm.data.table import DataError, FieldKind, check_table, read_parquet_metadata

QUIET = {"progress": False}
CFI_A, CFI_B = "a" * 16, "b" * 16


# --------------------------------------------------------------------------- helpers


def canonical_table(n: int = 300, n_users: int = 40, seed: int = 0, day: int = 0) -> pa.Table:
    """A canonical Ali-CCP table: users share their user fields, multi fields hold 0-5 ids,
    some single fields are absent, conversions only after clicks."""
    rng = np.random.default_rng(seed)
    user = rng.integers(0, n_users, n)
    click = (rng.random(n) < 0.4).astype(np.int8)
    conversion = (click & (rng.random(n) < 0.3)).astype(np.int8)
    columns: dict[str, pa.Array] = {
        "sample_id": pa.array(np.arange(1, n + 1), pa.int64()),
        "click": pa.array(click),
        "conversion": pa.array(conversion),
        "day": pa.array(np.full(n, day, np.int64)),
    }
    for name in ALICCP_FIELDS:
        owners = n_users if name in ALICCP_USER_FIELDS else n
        pick = user if name in ALICCP_USER_FIELDS else np.arange(n)
        if name in ALICCP_MULTI_FIELDS:
            lists = [rng.integers(0, 10**9, rng.integers(0, 6)).tolist() for _ in range(owners)]
            columns[name] = pa.array([lists[i] for i in pick], pa.list_(pa.int64()))
        else:
            values = rng.integers(0, 10**6, owners)[pick]
            absent = (rng.random(owners) < 0.15)[pick]
            columns[name] = pa.array(values, pa.int64(), mask=absent)
    return pa.table(columns)


def feature_list(features: list[tuple[str, object]], value: str = "1.0") -> str:
    return "\x01".join(f"{f}\x02{i}\x03{value}" for f, i in features)


def skeleton_line(
    sample_id: object,
    click: object,
    conversion: object,
    cfi: str,
    features: list[tuple[str, object]],
    count: object = None,
) -> str:
    count = len(features) if count is None else count
    return f"{sample_id},{click},{conversion},{cfi},{count},{feature_list(features)}"


def common_line(cfi: str, features: list[tuple[str, object]]) -> str:
    return f"{cfi},{len(features)},{feature_list(features)}"


def write_lines(path: Path, lines: list[str], end: str = "\n") -> Path:
    path.write_bytes("".join(line + end for line in lines).encode())
    return path


@pytest.fixture
def common(tmp_path: Path) -> Path:
    return write_lines(
        tmp_path / "common.csv",
        [
            common_line(CFI_A, [("101", 11), ("109_14", 1), ("109_14", 2), ("121", 3)]),
            common_line(CFI_B, [("101", 22), ("150_14", 5)]),
        ],
    )


def good(sample_id: int, click: int = 0, conversion: int = 0, item: int = 7) -> str:
    return skeleton_line(
        sample_id, click, conversion, CFI_A, [("205", item), ("210", 1), ("210", 2)]
    )


def read(tmp_path: Path, lines: list[str], common: Path, **options) -> tuple:
    skeleton = write_lines(tmp_path / "skeleton.csv", lines)
    return read_aliccp_raw(skeleton, common, **{**QUIET, **options})


# --------------------------------------------------------------------------- schema


def test_schema_lists_the_23_fields_with_their_kinds() -> None:
    schema = aliccp_schema()
    assert schema.names() == list(ALICCP_FIELDS)
    assert len(ALICCP_FIELDS) == 23
    assert schema.names(FieldKind.MULTI) == ["109_14", "110_14", "127_14", "150_14", "210"]
    assert all(schema[name].allow_missing for name in schema.names(FieldKind.SINGLE))


# --------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("chunk_bytes", [64 << 20, 700])
def test_round_trip_gives_back_the_same_table(tmp_path: Path, chunk_bytes: int) -> None:
    table = canonical_table()
    skeleton, common_file = write_aliccp_raw(table, tmp_path / "s.csv", tmp_path / "c.csv")
    assert skeleton.stat().st_size > 50 * 700  # the small chunks are many
    back, report = read_aliccp_raw(skeleton, common_file, chunk_bytes=chunk_bytes, **QUIET)
    assert back.equals(table)
    check_table(back, aliccp_schema(), str(skeleton))
    assert report.lines_read == report.rows_kept == table.num_rows
    assert report.malformed == report.unknown_common_feature_index == 0
    assert report.duplicate_rows == report.feature_count_mismatch == 0
    assert report.common_records == report.common_lines_read <= 40
    assert report.clicks == pc.sum(table["click"]).as_py()
    assert report.conversions == pc.sum(table["conversion"]).as_py()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.csv", "s.csv"]


def test_round_trip_of_a_chunked_table_without_sample_ids(tmp_path: Path) -> None:
    table = canonical_table(n=120)
    chunked = pa.concat_tables([table.slice(0, 50), table.slice(50)]).drop_columns(["sample_id"])
    skeleton, common_file = write_aliccp_raw(chunked, tmp_path / "s.csv", tmp_path / "c.csv")
    back, _ = read_aliccp_raw(skeleton, common_file, **QUIET)
    assert back.equals(table)  # sample ids written as row numbers from 1


def test_row_groups_are_capped_by_feature_ids(tmp_path: Path, monkeypatch) -> None:
    from esmm.data import aliccp

    table = canonical_table(n=100)
    skeleton, common_file = write_aliccp_raw(table, tmp_path / "s.csv", tmp_path / "c.csv")
    monkeypatch.setattr(aliccp, "_MAX_BATCH_IDS", 40)
    out = tmp_path / "t.parquet"
    convert_aliccp_raw(skeleton, common_file, out, **QUIET)
    assert pq.ParquetFile(out).num_row_groups > 10
    assert pq.read_table(out).equals(table)


def test_written_files_follow_the_tianchi_format(tmp_path: Path) -> None:
    table = canonical_table(n=50, n_users=5)
    skeleton, common_file = write_aliccp_raw(table, tmp_path / "s.csv", tmp_path / "c.csv")
    records = {}
    for line in common_file.read_text().splitlines():
        cfi, count, features = line.split(",")
        assert len(cfi) == 16 and int(cfi, 16) >= 0
        tokens = features.split("\x01") if features else []
        assert int(count) == len(tokens)
        assert {t.split("\x02")[0] for t in tokens} <= set(ALICCP_USER_FIELDS)
        records[cfi] = tokens
    assert len(records) <= 5
    lines = skeleton.read_text().splitlines()
    assert len(lines) == 50
    for line, sample_id in zip(lines, table["sample_id"].to_pylist(), strict=True):
        parts = line.split(",")
        assert len(parts) == 6 and int(parts[0]) == sample_id and parts[3] in records
        tokens = parts[5].split("\x01") if parts[5] else []
        assert int(parts[4]) == len(tokens)
        assert not {t.split("\x02")[0] for t in tokens} & set(ALICCP_USER_FIELDS)


def test_writer_rejects_tables_it_cannot_write(tmp_path: Path) -> None:
    table = canonical_table(n=10)
    with pytest.raises(DataError, match="missing columns"):
        write_aliccp_raw(table.drop_columns(["click"]), tmp_path / "s", tmp_path / "c")
    for name, values, message in [
        ("101", pa.array(["x"] * 10), "'101' has type string"),
        ("205", pa.array([-1] * 10), "'205' has 10 ids outside"),
        ("210", pa.array([[10**18]] * 10), "'210' has 10 ids outside"),
        ("click", pa.array([2] * 10), "'click' has 10 values"),
        ("conversion", pa.array([None] * 10, pa.int8()), "'conversion' has 10 values"),
    ]:
        bad = table.set_column(table.schema.get_field_index(name), name, values)
        with pytest.raises(DataError, match=message):
            write_aliccp_raw(bad, tmp_path / "s", tmp_path / "c")
    assert list(tmp_path.iterdir()) == []


def test_convert_writes_parquet_atomically_with_the_report(tmp_path: Path) -> None:
    table = canonical_table(n=200)
    skeleton, common_file = write_aliccp_raw(table, tmp_path / "s.csv", tmp_path / "c.csv")
    out = tmp_path / "out" / "train.parquet"
    report = convert_aliccp_raw(skeleton, common_file, out, chunk_bytes=2000, **QUIET)
    assert pq.read_table(out).equals(table)
    assert pq.ParquetFile(out).num_row_groups > 1
    meta = read_parquet_metadata(out)
    assert meta["schema"] == aliccp_schema().to_dict() and meta["source"] == "aliccp-raw"
    saved = json.loads(pq.ParquetFile(out).metadata.metadata[REPORT_METADATA_KEY.encode()])
    assert saved == report.to_dict() and report.rows_kept == 200
    assert report.output_path == str(out)
    assert [p.name for p in out.parent.iterdir()] == ["train.parquet"]


def test_convert_leaves_nothing_when_a_later_chunk_fails(tmp_path: Path, common: Path) -> None:
    lines = [good(i, item=i) for i in range(1, 400)] + ["400,0,0,truncated"]
    skeleton = write_lines(tmp_path / "skeleton.csv", lines)
    out = tmp_path / "out" / "train.parquet"
    with pytest.raises(DataError) as error:
        convert_aliccp_raw(skeleton, common, out, chunk_bytes=1000, on_malformed="error", **QUIET)
    assert str(skeleton) in str(error.value) and "line 400" in str(error.value)
    assert not out.exists()
    assert list(out.parent.iterdir()) == []


# --------------------------------------------------------------------------- bad lines


BAD_LINES = [
    ("5,0,0," + CFI_A, "wrong number of columns"),
    ("5,0,0," + CFI_A + ",2,205\x027\x031.0\x01206\x02", "missing \\x03 separator"),
    ("5,0,0," + CFI_A + ",1,2057\x031.0", "missing \\x02 separator"),
    ("5,0,0," + CFI_A + ",1,205\x0271.0", "missing \\x03 separator"),
    ("5,0,0," + CFI_A + ",1,205\x027\x031.0\x032", "repeated"),
    ("5,x,0," + CFI_A + ",1,205\x027\x031.0", "non-numeric label"),
    ("5,2,0," + CFI_A + ",1,205\x027\x031.0", "label outside {0,1}"),
    ("5,0,-1," + CFI_A + ",1,205\x027\x031.0", "non-numeric label"),
    ("5,0,0," + CFI_A + ",1,205\x02seven\x031.0", "non-numeric feature id"),
    ("5,0,0," + CFI_A + ",1,205\x027\x03one", "non-numeric feature value"),
    ("5,0,0," + CFI_A + ",one,205\x027\x031.0", "non-numeric feature_count"),
    ("5,0,0," + CFI_A + ",1,\x027\x031.0", "empty field id"),
    ("5,0,0,,1,205\x027\x031.0", "empty common_feature_index"),
    ("x5,0,0," + CFI_A + ",1,205\x027\x031.0", "non-numeric sample_id"),
    ("5,0,0," + CFI_A + ",1,205\x027\x031.0\x01", "missing \\x02 separator"),
    ("5,0,0," + CFI_A + ",1,205\x02é\x031.0", "non-ASCII byte"),
]


@pytest.mark.parametrize(("bad", "reason"), BAD_LINES)
def test_a_malformed_line_is_reported_with_its_number_and_reason(
    tmp_path: Path, common: Path, bad: str, reason: str
) -> None:
    lines = [good(1), good(2, item=8), bad, good(4, item=9)]
    table, report = read(tmp_path, lines, common, sample_id="int64")
    assert table["sample_id"].to_pylist() == [1, 2, 4]
    assert report.malformed == 1 and report.lines_read == 4 and report.rows_kept == 3
    [(line, why)] = report.malformed_lines
    assert line == 3 and reason in why, why


@pytest.mark.parametrize(("bad", "reason"), BAD_LINES[:6])
def test_on_malformed_error_names_file_line_and_reason(
    tmp_path: Path, common: Path, bad: str, reason: str
) -> None:
    with pytest.raises(DataError) as error:
        read(tmp_path, [good(1), bad], common, on_malformed="error")
    message = str(error.value)
    assert str(tmp_path / "skeleton.csv") in message
    assert "1 malformed lines" in message and "line 2: " in message and reason in message


def test_malformed_common_features_line_names_the_common_file(tmp_path: Path) -> None:
    common_file = write_lines(
        tmp_path / "common.csv", [common_line(CFI_A, [("101", 1)]), "bbbb,1,101\x02x\x031"]
    )
    lines = [good(1), skeleton_line(2, 0, 0, "bbbb", [("205", 3)])]
    table, report = read(tmp_path, lines, common_file)
    assert report.common_malformed == 1
    assert report.common_malformed_lines == [
        (2, "non-numeric feature id in feature '101\\x02x\\x031'")
    ]
    assert report.unknown_common_feature_index == 1  # its record is gone
    assert table.num_rows == 1
    with pytest.raises(DataError, match=r"common\.csv: 1 malformed lines .*line 2: non-numeric"):
        read(tmp_path, lines, common_file, on_malformed="error")


def test_many_malformed_lines_list_the_first_twenty(tmp_path: Path, common: Path) -> None:
    lines = [good(1)] + [f"{i},0" for i in range(2, 40)]
    _, report = read(tmp_path, lines, common, chunk_bytes=100)
    assert report.malformed == 38
    assert [line for line, _ in report.malformed_lines] == list(range(2, 22))


def test_unknown_common_feature_index_drops_the_row(tmp_path: Path, common: Path) -> None:
    lines = [good(1), skeleton_line(2, 1, 0, "c" * 16, [("205", 1)]), good(3, item=5)]
    table, report = read(tmp_path, lines, common)
    assert table["sample_id"].to_pylist() == [1, 3]
    assert report.unknown_common_feature_index == 1
    assert report.unknown_common_feature_index_lines == [2]


def test_conversion_without_click_policies(tmp_path: Path, common: Path) -> None:
    lines = [good(1, 1, 1), good(2, 0, 1, item=8), good(3, item=9), good(4, 0, 1, item=10)]
    table, report = read(tmp_path, lines, common)  # default: drop
    assert table["sample_id"].to_pylist() == [1, 3]
    assert report.conversion_without_click == 2
    assert report.conversion_without_click_lines == [2, 4]
    assert report.conversion_without_click_policy == "drop"

    table, report = read(tmp_path, lines, common, conversion_without_click="clear")
    assert table["sample_id"].to_pylist() == [1, 2, 3, 4]
    assert table["conversion"].to_pylist() == [1, 0, 0, 0]
    assert report.conversion_without_click == 2 and report.conversions == 1
    check_table(table, aliccp_schema(), "cleared")

    with pytest.raises(DataError) as error:
        read(tmp_path, lines, common, conversion_without_click="error")
    message = str(error.value)
    assert str(tmp_path / "skeleton.csv") in message and "2 lines" in message
    assert "[2, 4]" in message


def test_empty_and_missing_files_raise_naming_the_path(tmp_path: Path, common: Path) -> None:
    empty = write_lines(tmp_path / "empty.csv", [])
    with pytest.raises(DataError, match=r"empty\.csv: the file is empty"):
        read_aliccp_raw(empty, common, **QUIET)
    blank = write_lines(tmp_path / "blank.csv", ["", ""])
    with pytest.raises(DataError, match=r"blank\.csv: the file is empty"):
        read_aliccp_raw(blank, common, **QUIET)
    skeleton = write_lines(tmp_path / "s.csv", [good(1)])
    with pytest.raises(DataError, match=r"nope\.csv: file not found"):
        read_aliccp_raw(tmp_path / "nope.csv", common, **QUIET)
    with pytest.raises(DataError, match=r"nope\.csv: file not found"):
        read_aliccp_raw(skeleton, tmp_path / "nope.csv", **QUIET)
    with pytest.raises(DataError, match=r"empty\.csv: the file is empty"):
        read_aliccp_raw(skeleton, empty, **QUIET)
    with pytest.raises(DataError, match=r"nope\.txt: file not found"):
        read_paddlerec(tmp_path / "nope.txt", **QUIET)
    with pytest.raises(DataError, match=f"{tmp_path}: not a file"):
        read_paddlerec(tmp_path, **QUIET)


def test_no_valid_rows_raises_with_the_report(tmp_path: Path, common: Path) -> None:
    with pytest.raises(DataError, match=r"skeleton\.csv: no valid rows(.|\n)*malformed lines"):
        read(tmp_path, ["1,0", "2,x,0," + CFI_A + ",0,"], common)


# --------------------------------------------------------------------------- counted cases


def test_duplicate_rows_are_counted_and_kept(tmp_path: Path) -> None:
    common_file = write_lines(
        tmp_path / "common.csv",
        [
            common_line(CFI_A, [("101", 5), ("150_14", 1), ("150_14", 2)]),
            common_line(CFI_B, [("101", 6), ("150_14", 1), ("150_14", 2)]),
        ],
    )
    item = [("205", 3), ("210", 4), ("210", 5)]
    lines = [
        skeleton_line(1, 1, 0, CFI_A, item),
        skeleton_line(2, 1, 0, CFI_A, item),  # duplicate of line 1
        skeleton_line(3, 0, 0, CFI_A, item),  # other label
        skeleton_line(4, 1, 0, CFI_A, [("205", 3), ("210", 5), ("210", 4)]),  # other order
        skeleton_line(5, 1, 0, CFI_B, item),  # other user
        skeleton_line(6, 1, 0, CFI_B, [("101", 5), *item]),  # skeleton's 101 wins: = line 1
    ]
    for chunk_bytes in (64 << 20, 60):
        table, report = read(tmp_path, lines * 2, common_file, chunk_bytes=chunk_bytes)
        assert table.num_rows == 12
        assert report.duplicate_rows == 8
        assert report.duplicate_row_lines == [2, 6, 7, 8, 9, 10, 11, 12]
        assert table["101"].to_pylist()[:6] == [5, 5, 5, 5, 6, 5]


def test_repeated_single_field_keeps_the_first_id(tmp_path: Path) -> None:
    common_file = write_lines(
        tmp_path / "common.csv", [common_line(CFI_A, [("101", 5), ("101", 6), ("121", 1)])]
    )
    lines = [
        skeleton_line(1, 0, 0, CFI_A, [("205", 3), ("205", 4), ("205", 5)]),
        skeleton_line(2, 0, 0, CFI_A, [("205", 6), ("101", 9)]),  # 101 from the skeleton
    ]
    table, report = read(tmp_path, lines, common_file)
    assert table["205"].to_pylist() == [3, 6]
    assert table["101"].to_pylist() == [5, 9]
    assert report.repeated_single_field_values == 2 + 1  # two on line 1, one inherited


def test_repeated_common_feature_index_keeps_the_first_record(tmp_path: Path) -> None:
    common_file = write_lines(
        tmp_path / "common.csv",
        [
            common_line(CFI_A, [("101", 1)]),
            common_line(CFI_B, [("101", 2)]),
            common_line(CFI_A, [("101", 3)]),
        ],
    )
    table, report = read(tmp_path, [good(1)], common_file)
    assert table["101"].to_pylist() == [1]
    assert report.common_records == 3
    assert report.common_duplicate_index == 1 and report.common_duplicate_index_lines == [3]


def test_last_line_without_line_break(tmp_path: Path, common: Path) -> None:
    skeleton = tmp_path / "skeleton.csv"
    skeleton.write_bytes((good(1) + "\n" + good(2, item=5)).encode())
    table, report = read_aliccp_raw(skeleton, common, chunk_bytes=30, **QUIET)
    assert table["205"].to_pylist() == [7, 5] and report.lines_read == 2
    skeleton.write_bytes((good(1) + "\n" + good(2, item=5)[:-3]).encode())  # cut mid-value
    table, report = read_aliccp_raw(skeleton, common, **QUIET)
    assert table.num_rows == 1 and report.malformed_lines[0][0] == 2


def test_ids_have_up_to_18_digits(tmp_path: Path, common: Path) -> None:
    big = 10**18 - 1
    lines = [
        skeleton_line(1, 0, 0, CFI_A, [("205", big), ("206", 0), ("207", "000123")]),
        skeleton_line(2, 0, 0, CFI_A, [("205", 10**18)]),
    ]
    table, report = read(tmp_path, lines, common)
    assert table.select(["205", "206", "207"]).to_pylist() == [{"205": big, "206": 0, "207": 123}]
    assert (
        report.malformed_lines[0][0] == 2
        and "non-numeric feature id" in report.malformed_lines[0][1]
    )


def test_feature_count_mismatch_and_unknown_fields_are_counted(
    tmp_path: Path, common: Path
) -> None:
    lines = [
        skeleton_line(1, 0, 0, CFI_A, [("205", 3)], count=2),
        skeleton_line(2, 0, 0, CFI_A, [("205", 4), ("999", 1), ("abc_1", 2)]),
    ]
    table, report = read(tmp_path, lines, common)
    assert table["205"].to_pylist() == [3, 4]
    assert report.feature_count_mismatch == 1 and report.feature_count_mismatch_lines == [1]
    assert report.unknown_field_features == 2 and report.unknown_field_lines == [2]


def test_field_names_are_matched_whole(tmp_path: Path, common: Path) -> None:
    near = [("x205", 1), ("0205", 2), ("20", 3), ("109_1", 4), ("x109_14", 5), ("2055", 6)]
    lines = [
        skeleton_line(1, 0, 0, CFI_A, [*near, ("205", 7), ("109_14", 8), ("210", 9)]),
        skeleton_line(2, 0, 0, CFI_A, [("206", 1), *near]),  # a near name right after the comma
    ]
    table, report = read(tmp_path, lines, common)
    rows = table.to_pylist()
    assert rows[0]["205"] == 7 and rows[0]["109_14"] == [8] and rows[0]["210"] == [9]
    assert rows[1]["206"] == 1 and rows[1]["205"] is None and rows[1]["109_14"] == [1, 2]
    assert report.unknown_field_features == 2 * len(near) and report.unknown_field_lines == [1, 2]


def test_user_fields_from_the_skeleton_in_some_chunks_only(tmp_path: Path, common: Path) -> None:
    """Chunks where every row takes a user field from its common record, and chunks where
    some rows carry it on the skeleton line, give the same rows."""
    lines = [good(i) for i in range(1, 40)]
    lines[30] = skeleton_line(31, 0, 0, CFI_A, [("205", 7), ("109_14", 9), ("101", 5)])
    for chunk_bytes in (64 << 20, 200):
        table, report = read(tmp_path, lines, common, chunk_bytes=chunk_bytes)
        assert table["109_14"].to_pylist() == [[1, 2]] * 30 + [[9]] + [[1, 2]] * 8
        assert table["101"].to_pylist() == [11] * 30 + [5] + [11] * 8
        assert table["121"].to_pylist() == [3] * 39 and report.rows_kept == 39


def test_runs_of_common_feature_indexes_find_their_records(tmp_path: Path, common: Path) -> None:
    order = [CFI_A, CFI_A, CFI_B, "c" * 16, "c" * 16, CFI_B, CFI_A, CFI_B]
    lines = [skeleton_line(i + 1, 0, 0, cfi, [("205", i)]) for i, cfi in enumerate(order)]
    for chunk_bytes in (64 << 20, 90):  # runs cut by chunk ends too
        table, report = read(tmp_path, lines, common, chunk_bytes=chunk_bytes)
        assert table["101"].to_pylist() == [11, 11, 22, 22, 11, 22]
        assert table["205"].to_pylist() == [0, 1, 2, 5, 6, 7]
        assert report.unknown_common_feature_index_lines == [4, 5]


def test_a_malformed_line_among_many_leaves_its_chunk_readable(
    tmp_path: Path, common: Path
) -> None:
    lines = [good(i, item=i) for i in range(1, 2001)]
    lines[1234] = lines[1234].replace("\x03", "\x03x", 1)  # a bad value in line 1235
    table, report = read(tmp_path, lines, common, sample_id="int64")
    assert report.malformed == 1 and report.malformed_lines[0][0] == 1235
    assert "non-numeric feature value" in report.malformed_lines[0][1]
    expected = [i for i in range(1, 2001) if i != 1235]
    assert table["sample_id"].to_pylist() == expected and table["205"].to_pylist() == expected
    assert table["109_14"].to_pylist() == [[1, 2]] * 1999


def test_fields_join_absent_values_and_line_endings(tmp_path: Path, common: Path) -> None:
    lines = [
        skeleton_line(7, 1, 1, CFI_A, [("210", 4), ("301", 2), ("210", 3)]),
        skeleton_line(8, 0, 0, CFI_B, []),
        "",
        skeleton_line(9, 0, 0, CFI_B, [("127_14", 1)]),
    ]
    for end in ("\n", "\r\n"):
        skeleton = write_lines(tmp_path / "skeleton.csv", lines, end=end)
        table, report = read_aliccp_raw(skeleton, common, day=1, **QUIET)
        rows = table.to_pylist()
        assert [r["sample_id"] for r in rows] == [7, 8, 9]
        assert rows[0]["210"] == [4, 3] and rows[0]["301"] == 2 and rows[0]["205"] is None
        assert rows[0]["101"] == 11 and rows[0]["109_14"] == [1, 2] and rows[0]["121"] == 3
        assert rows[1]["101"] == 22 and rows[1]["109_14"] == [] and rows[1]["150_14"] == [5]
        assert rows[2]["127_14"] == [1] and rows[2]["150_14"] == [5]  # skeleton adds, common kept
        assert table["day"].to_pylist() == [1, 1, 1]
        assert report.blank_lines == 1 and report.lines_read == 4 and report.malformed == 0


def test_string_sample_ids_are_kept_as_strings(tmp_path: Path, common: Path) -> None:
    lines = [skeleton_line("s1", 0, 0, CFI_A, [("205", 1)]), good(2)]
    table, report = read(tmp_path, lines, common)
    assert table["sample_id"].to_pylist() == ["s1", "2"]
    assert report.sample_id_type == "string"
    # "auto" decides on the first chunk: integers there make a later text id malformed
    lines = [good(1), good(2, item=8), skeleton_line("s3", 0, 0, CFI_A, [("205", 1)])]
    table, report = read(tmp_path, lines, common, chunk_bytes=40)
    assert table["sample_id"].to_pylist() == [1, 2] and report.sample_id_type == "int64"
    assert report.malformed_lines == [(3, "non-numeric sample_id")]


def test_report_to_dict_and_summary(tmp_path: Path, common: Path) -> None:
    _, report = read(tmp_path, [good(1), good(2, 0, 1), "3,0"], common)
    data = report.to_dict()
    json.dumps(data)
    assert data["malformed_lines"] == [{"line": 3, "reason": data["malformed_lines"][0]["reason"]}]
    assert AliccpReadReport(**{**data, "malformed_lines": [], "common_malformed_lines": []})
    summary = report.summary()
    assert "rows kept: 1" in summary and "conversion=1 with click=0: 1 (policy drop)" in summary
    assert "malformed lines (dropped): 1" in summary


def test_progress_bar_runs(tmp_path: Path, common: Path) -> None:
    table, _ = read(tmp_path, [good(1)], common, progress=True)
    assert table.num_rows == 1


def test_bad_options_raise_value_error(tmp_path: Path, common: Path) -> None:
    skeleton = write_lines(tmp_path / "s.csv", [good(1)])
    for options in (
        {"conversion_without_click": "keep"},
        {"on_malformed": "ignore"},
        {"chunk_bytes": 0},
        {"workers": 0},
    ):
        with pytest.raises(ValueError):
            read_aliccp_raw(skeleton, common, **QUIET, **options)


# --------------------------------------------------------------------------- chunks in threads


def noisy_skeleton(tmp_path: Path) -> tuple[Path, Path]:
    """A skeleton file of many small chunks with every kind of line the report counts:
    malformed, conversion without click, unknown common_feature_index, duplicates."""
    rng = np.random.default_rng(11)
    table = canonical_table(n=600, n_users=30, seed=5)
    skeleton, common_file = write_aliccp_raw(table, tmp_path / "s.csv", tmp_path / "c.csv")
    lines = skeleton.read_text().splitlines()
    for at in rng.choice(len(lines), 60, replace=False):
        kind = int(rng.integers(0, 4))
        if kind == 0:  # malformed
            lines[at] = lines[at].replace("\x02", "", 1)
        elif kind == 1:  # conversion without click
            sample_id, _, _, rest = lines[at].split(",", 3)
            lines[at] = f"{sample_id},0,1,{rest}"
        elif kind == 2:  # unknown common_feature_index
            parts = lines[at].split(",")
            lines[at] = ",".join([*parts[:3], "f" * 16, *parts[4:]])
        else:  # a duplicate of the previous line's content
            lines[at] = f"{at + 1}," + lines[at - 1].split(",", 1)[1]
    return write_lines(skeleton, lines), common_file


def parsed_in_threads(monkeypatch) -> list[str]:
    """Names of the threads that split chunks into lines, recorded as the reader runs."""
    from esmm.data import aliccp

    names: list[str] = []
    split = aliccp._split_lines

    def recording(chunk: bytes, first_line: int):
        names.append(threading.current_thread().name)
        return split(chunk, first_line)

    monkeypatch.setattr(aliccp, "_split_lines", recording)
    return names


@pytest.mark.parametrize("policy", ["drop", "clear"])
def test_threads_give_the_single_threaded_table_and_report(
    tmp_path: Path, monkeypatch, policy: str
) -> None:
    skeleton, common_file = noisy_skeleton(tmp_path)
    threads = parsed_in_threads(monkeypatch)
    options = {**QUIET, "chunk_bytes": 2000, "conversion_without_click": policy}
    one, one_report = read_aliccp_raw(skeleton, common_file, workers=1, **options)
    assert threads and not any(name.startswith("aliccp") for name in threads)
    assert one_report.malformed and one_report.conversion_without_click
    assert one_report.unknown_common_feature_index and one_report.duplicate_rows
    for workers in (2, 3):
        threads.clear()
        table, report = read_aliccp_raw(skeleton, common_file, workers=workers, **options)
        assert sum(name.startswith("aliccp") for name in threads) > 50
        assert table.equals(one)
        assert [batch.num_rows for batch in table.to_batches()] == [
            batch.num_rows for batch in one.to_batches()
        ]
        assert {**report.to_dict(), "seconds": 0} == {**one_report.to_dict(), "seconds": 0}
    out = tmp_path / "t.parquet"
    convert_aliccp_raw(skeleton, common_file, out, workers=2, **options)
    assert pq.read_table(out).equals(one)


def test_lines_in_later_chunks_are_reported_with_their_file_numbers(
    tmp_path: Path, common: Path
) -> None:
    lines = [good(i, item=i) for i in range(1, 301)]
    malformed = [137, 138, 212, *range(240, 260), 299]
    for at in malformed:
        lines[at - 1] = f"{at},0"
    lines[180 - 1] = good(180, 0, 1, item=180)  # conversion without click
    skeleton = write_lines(tmp_path / "skeleton.csv", lines)
    assert skeleton.stat().st_size > 40 * 300  # chunks of 300 bytes: dozens of them
    for workers in (1, 2):
        _, report = read_aliccp_raw(skeleton, common, chunk_bytes=300, workers=workers, **QUIET)
        assert report.malformed == len(malformed)
        assert report.malformed_lines == [
            (at, "wrong number of columns (truncated line?): 2 columns, 6 expected")
            for at in malformed[:20]
        ]
        assert report.conversion_without_click_lines == [180]
        assert report.lines_read == 300 and report.rows_kept == 300 - len(malformed) - 1
        with pytest.raises(DataError, match=r"1 lines with conversion=1 .* \[180\]"):
            read_aliccp_raw(
                skeleton, common, chunk_bytes=300, workers=workers, on_malformed="report",
                conversion_without_click="error", **QUIET,
            )  # fmt: skip
        first_bad = r"skeleton\.csv: 2 malformed lines in lines \d+-\d+ .*line 137: .*; line 138: "
        with pytest.raises(DataError, match=first_bad):
            read_aliccp_raw(
                skeleton, common, chunk_bytes=300, workers=workers, on_malformed="error", **QUIET
            )


def test_auto_sample_id_type_comes_from_the_first_chunk_with_a_line(
    tmp_path: Path, common: Path
) -> None:
    lines = ["1,0", "2,0", "", good(4), *(good(i, item=i) for i in range(5, 60))]
    lines[30] = lines[30].replace("31,", "x31,", 1)  # a string id after int64 was chosen
    skeleton = write_lines(tmp_path / "skeleton.csv", lines)
    results = [
        read_aliccp_raw(skeleton, common, chunk_bytes=60, workers=workers, **QUIET)
        for workers in (1, 2)
    ]
    for table, report in results:
        assert report.sample_id_type == "int64" and table.schema.field("sample_id").type == "int64"
        assert [line for line, _ in report.malformed_lines] == [1, 2, 31]
        assert "non-numeric sample_id" in report.malformed_lines[2][1]
    assert results[0][0].equals(results[1][0])


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_chunks_in_flight_are_bounded(tmp_path: Path, monkeypatch, workers: int) -> None:
    from esmm.data import aliccp

    table = canonical_table(n=400)
    skeleton, common_file = write_aliccp_raw(table, tmp_path / "s.csv", tmp_path / "c.csv")
    first_lines: list[int] = []  # of the skeleton chunks read so far
    iter_chunks = aliccp._iter_chunks

    def recording(path: Path, *args):
        for chunk in iter_chunks(path, *args):
            if path == skeleton:
                first_lines.append(chunk.first_line)
            yield chunk

    monkeypatch.setattr(aliccp, "_iter_chunks", recording)
    reader = aliccp._Reader(
        "raw", skeleton, common_file, day=0, chunk_bytes=1000, cwc="drop",
        on_malformed="report", sample_id="int64", progress=False, workers=workers,
    )  # fmt: skip
    in_flight, batches = [], []
    for batch in reader._batches():  # sample_id is the line number
        chunk = int(np.searchsorted(first_lines, batch["sample_id"][0].as_py(), "right")) - 1
        in_flight.append(len(first_lines) - chunk)  # read, and not yet handed on
        batches.append(batch)
    assert len(first_lines) > 40
    assert max(in_flight) == (workers + 1 if workers > 1 else 1), in_flight
    assert pa.Table.from_batches(batches).equals(table)


# --------------------------------------------------------------------------- PaddleRec


def test_paddlerec_lines(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "p.txt",
        [
            "1,1,0,101:4,210:1,210:2,301:3",
            "2,0,0",
            "3,0,0,101:4,210:1,bad",
            "4,0,0,101:4,999:1,205:6,205:7",
            "5,0,0,101:x",
            "6,1,1,101:1:2",
        ],
    )
    table, report = read_paddlerec(path, **QUIET)
    assert table["sample_id"].to_pylist() == [1, 2, 4]
    assert table["210"].to_pylist() == [[1, 2], [], []]
    assert table["205"].to_pylist() == [None, None, 6]
    assert report.malformed == 3
    assert [(line, why.split(" in ")[0]) for line, why in report.malformed_lines] == [
        (3, "missing ':' separator"),
        (5, "non-numeric feature id"),
        (6, "repeated ':' separator"),
    ]
    assert report.unknown_field_features == 1 and report.repeated_single_field_values == 1
    assert report.common_features_path is None and report.source_format == "paddlerec"


def _count_sample(path: Path) -> tuple[int, int, int, list[dict[str, int]]]:
    rows = clicks = conversions = 0
    per_line = []
    with open(path, newline="") as handle:
        for record in csv.reader(handle):
            rows += 1
            clicks += int(record[1])
            conversions += int(record[2])
            counts: dict[str, int] = {}
            for token in record[3:]:
                name = token.split(":")[0]
                counts[name] = counts.get(name, 0) + 1
            per_line.append(counts)
    return rows, clicks, conversions, per_line


@pytest.mark.parametrize("name", ["train_small.txt", "test_small.txt"])
def test_real_paddlerec_samples(shared_data: Path, name: str, tmp_path: Path) -> None:
    path = shared_data / "ali-ccp-paddlerec" / name
    if not path.is_file():
        pytest.skip(f"real PaddleRec sample not found at {path}")
    rows, clicks, conversions, per_line = _count_sample(path)
    table, report = read_paddlerec(path, day=0, **QUIET)
    assert table.num_rows == rows == report.rows_kept == report.lines_read
    assert pc.sum(table["click"]).as_py() == clicks == report.clicks
    assert pc.sum(table["conversion"]).as_py() == conversions == report.conversions
    assert report.malformed == 0 and report.conversion_without_click == 0
    for field_name in ALICCP_MULTI_FIELDS:
        lengths = pc.list_value_length(table[field_name]).to_pylist()
        assert lengths == [c.get(field_name, 0) for c in per_line], field_name
    for field_name in set(ALICCP_FIELDS) - ALICCP_MULTI_FIELDS:
        present = table[field_name].is_valid().to_pylist()
        assert present == [field_name in c for c in per_line], field_name
    assert pc.list_value_length(table["150_14"]).to_pylist()[0] > 100
    check_table(table, aliccp_schema(), str(path))
    small_chunks, _ = read_paddlerec(path, chunk_bytes=4096, **QUIET)
    assert small_chunks.equals(table)


# --------------------------------------------------------------------------- reference parser

NUMBER = r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"


def reference_parse(line: str, users: dict[str, dict]) -> dict | None:
    """A plain per-line reading of one skeleton line (None if malformed or dropped)."""
    import re

    parts = line.split(",")
    if len(parts) != 6 or not line.isascii():
        return None
    sample_id, click, conversion, cfi, count, features = parts
    digits = re.compile(r"[0-9]{1,18}")
    if not all(digits.fullmatch(x) for x in (sample_id, click, conversion, count)):
        return None
    if int(click) > 1 or int(conversion) > 1 or not cfi:
        return None
    row: dict = {}
    for token in features.split("\x01") if features else []:
        name, sep2, rest = token.partition("\x02")
        feature_id, sep3, value = rest.partition("\x03")
        if not (sep2 and sep3 and name) or "\x02" in rest or "\x03" in value:
            return None
        if not digits.fullmatch(feature_id) or not re.fullmatch(NUMBER, value):
            return None
        if name in ALICCP_FIELDS:
            row.setdefault(name, []).append(int(feature_id))
    if cfi not in users or (int(conversion) and not int(click)):
        return None
    merged = {**users[cfi], **row}
    out = {"sample_id": int(sample_id), "click": int(click), "conversion": int(conversion)}
    for name in ALICCP_FIELDS:
        ids = merged.get(name, [])
        out[name] = ids if name in ALICCP_MULTI_FIELDS else (ids[0] if ids else None)
    return out


@pytest.mark.parametrize("chunk_bytes", [64 << 20, 500])
def test_corrupted_lines_match_a_plain_reference_reader(tmp_path: Path, chunk_bytes: int) -> None:
    rng = np.random.default_rng(7)
    table = canonical_table(n=400, n_users=30, seed=3)
    skeleton, common_file = write_aliccp_raw(table, tmp_path / "s.csv", tmp_path / "c.csv")
    users = {}
    for line in common_file.read_text().splitlines():
        cfi, _, features = line.split(",")
        record: dict[str, list[int]] = {}
        for token in features.split("\x01") if features else []:
            name, _, rest = token.partition("\x02")
            record.setdefault(name, []).append(int(rest.partition("\x03")[0]))
        users[cfi] = record
    noise = [",", "\x01", "\x02", "\x03", "x", "", "9", ".", "\x02\x02", "é"]
    lines = []
    for line in skeleton.read_text().splitlines():
        if rng.random() < 0.3:  # replace one character by a random piece of noise
            at = int(rng.integers(0, len(line)))
            line = line[:at] + noise[int(rng.integers(0, len(noise)))] + line[at + 1 :]
        lines.append(line)
    corrupted = write_lines(tmp_path / "corrupted.csv", lines)
    expected = [r for r in (reference_parse(line, users) for line in lines) if r is not None]
    got, report = read_aliccp_raw(
        corrupted, common_file, chunk_bytes=chunk_bytes, sample_id="int64", **QUIET
    )
    assert 50 < report.malformed < 200
    got_rows = got.drop_columns(["day"]).to_pylist()
    assert [r["sample_id"] for r in got_rows] == [r["sample_id"] for r in expected]
    assert got_rows == expected
