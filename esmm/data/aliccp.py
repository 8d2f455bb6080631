"""Ali-CCP (Alibaba Click and Conversion Prediction) readers and writer.

Two text formats give the same canonical table (see :mod:`esmm.data.table`):

- the raw Tianchi files: a skeleton file, one impression per line
  ``sample_id,click,conversion,common_feature_index,feature_count,feature_list``, and a
  common-features file, one record per line ``common_feature_index,feature_count,feature_list``
  holding the user fields shared by many impressions. In a feature list, features are separated
  by ``\\x01`` and each is ``field_id\\x02feature_id\\x03value``. User fields come from the
  common-features record named by the skeleton line; item, combination and context fields from
  the skeleton line itself; a field present in both is taken from the skeleton line.
- the PaddleRec ESMM text format: ``sample_id,click,conversion,field:feature_id,...`` with a
  multi-valued field repeated once per id.

The canonical table has ``sample_id`` (``int64`` or ``string``, as in the file: see the
``sample_id`` option of the readers), ``click`` and ``conversion`` (``int8``), ``day``
(``int64``, given by the caller: Ali-CCP's train file is the first half of time and its test
file the second, so pass ``day=0`` for train and ``day=1`` for test), then one column per
Ali-CCP field, named by the field id (:data:`ALICCP_FIELDS`): a single field is an ``int64``
feature id (null when the impression has none), a multi field (:data:`ALICCP_MULTI_FIELDS`) a
``list<int64>`` of feature ids (empty when it has none). Feature ids (1 to 18 decimal digits)
are sum-pooled per field by the model; the ``\\x03value`` part of a raw feature is parsed and
validated as a decimal number but not kept: values are ignored. A single field given more than
once in one impression keeps its first id; the dropped ids are counted.

Parsing is vectorised over chunks of lines (``pyarrow.compute`` string kernels and numpy); Python
code runs per line only to word the few bad lines that a report lists. Those kernels release the
GIL, so chunks are parsed by a pool of threads (``workers``, default one per available core),
a bounded number at a time, and handed on in file order. Every problem with the
data raises :class:`~esmm.data.table.DataError` naming the file, or is counted in an
:class:`AliccpReadReport` with the 1-based line numbers of the first
:data:`MAX_REPORTED_LINES` cases.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from esmm.data.table import CLICK, CONVERSION, DAY, DataError, FieldKind, FieldSpec, TableSchema

if TYPE_CHECKING:
    import pandas as pd

ALICCP_USER_FIELDS = (
    "101",
    "109_14",
    "110_14",
    "127_14",
    "150_14",
    "121",
    "122",
    "124",
    "125",
    "126",
    "127",
    "128",
    "129",
)
ALICCP_ITEM_FIELDS = ("205", "206", "207", "210", "216")
ALICCP_COMBINATION_FIELDS = ("508", "509", "702", "853")
ALICCP_CONTEXT_FIELDS = ("301",)
ALICCP_FIELDS = (
    *ALICCP_USER_FIELDS,
    *ALICCP_ITEM_FIELDS,
    *ALICCP_COMBINATION_FIELDS,
    *ALICCP_CONTEXT_FIELDS,
)
ALICCP_MULTI_FIELDS = frozenset({"109_14", "110_14", "127_14", "150_14", "210"})
SAMPLE_ID = "sample_id"
REPORT_METADATA_KEY = "esmm_aliccp_report"  # Parquet key-value metadata of a converted file
MAX_REPORTED_LINES = 20
# Lines read per chunk: 8 MiB keeps a chunk's numpy temporaries near the CPU caches and in the
# allocator's reused memory; 64 MiB chunks parse about 25% slower on the benchmark's file.
DEFAULT_CHUNK_BYTES = 8 << 20

ConversionPolicy = Literal["drop", "clear", "error"]
MalformedPolicy = Literal["report", "error"]
SampleIdType = Literal["auto", "int64", "string"]

_N_FIELDS = len(ALICCP_FIELDS)
_FIELD_NAMES = pa.array(ALICCP_FIELDS, pa.string())
_IS_MULTI = np.array([f in ALICCP_MULTI_FIELDS for f in ALICCP_FIELDS])
_IS_USER = np.array([f in ALICCP_USER_FIELDS for f in ALICCP_FIELDS])
# Well-formed lines, one regular expression each (RE2, linear time); lines that do not match are
# diagnosed token by token to name the reason.
_NUMBER = r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
_RAW_FEATURE = r"[^,\x01\x02\x03]+\x02[0-9]{1,18}\x03" + _NUMBER
_RAW_FEATURES = rf"(?:{_RAW_FEATURE}(?:\x01{_RAW_FEATURE})*)?$"
_PADDLE_FEATURES = r"(?:,[^,:]+:[0-9]{1,18})*$"
_MAX_BATCH_IDS = 1 << 24  # feature ids per output batch: bounds memory when user lists are long
_WRITE_ROWS = 1 << 17  # rows per slice when writing raw text

# Reasons a line is malformed (code -> wording); 0 means well-formed.
_REASONS = {
    1: "wrong number of columns (truncated line?)",
    2: "non-ASCII byte",
    3: "empty sample_id",
    4: "non-numeric sample_id",
    5: "non-numeric label",
    6: "label outside {0,1}",
    7: "empty common_feature_index",
    8: "non-numeric feature_count",
    9: "missing \\x02 separator",
    10: "missing \\x03 separator",
    11: "repeated \\x02/\\x03 separator",
    12: "empty field id",
    13: "non-numeric feature id",
    14: "non-numeric feature value",
    15: "missing ':' separator",
    16: "repeated ':' separator",
    17: "malformed feature list",
}
_BAD_COLUMNS, _NON_ASCII, _EMPTY_SAMPLE_ID, _BAD_SAMPLE_ID, _BAD_LABEL, _LABEL_RANGE = range(1, 7)
_EMPTY_INDEX, _BAD_COUNT = 7, 8
_NO_SEP1_RAW, _NO_SEP2_RAW, _EXTRA_SEP_RAW, _EMPTY_FIELD, _BAD_ID, _BAD_VALUE = range(9, 15)
_NO_SEP_PADDLE, _EXTRA_SEP_PADDLE, _BAD_LIST = 15, 16, 17

_K1 = np.uint64(0x9E3779B97F4A7C15)
_K2 = np.uint64(0xC2B2AE3D27D4EB4F)
_K3 = np.uint64(0x165667B19E3779F9)
_K4 = np.uint64(0xD6E8FEB86659FD93)
_K5 = np.uint64(0xFF51AFD7ED558CCD)


def aliccp_schema() -> TableSchema:
    """The 23 Ali-CCP fields: single fields may be missing, multi fields are id lists."""
    return TableSchema(
        tuple(
            FieldSpec(name, FieldKind.MULTI)
            if name in ALICCP_MULTI_FIELDS
            else FieldSpec(name, FieldKind.SINGLE, allow_missing=True)
            for name in ALICCP_FIELDS
        )
    )


@dataclass
class AliccpReadReport:
    """What reading one Ali-CCP file found. Line numbers are 1-based file line numbers; each
    ``*_lines`` list holds the first :data:`MAX_REPORTED_LINES` cases.

    - ``malformed``: lines dropped because they cannot be parsed (wrong column count / truncated
      line, missing or repeated separator, non-numeric label, id or value, label outside
      {0, 1}, non-ASCII byte); ``malformed_lines`` pairs each with its reason.
    - ``conversion_without_click``: well-formed lines with conversion=1 and click=0, handled by
      ``conversion_without_click_policy`` ("drop": row dropped, "clear": conversion set to 0,
      "error": :class:`DataError` at the first chunk that has one, naming the file, the count
      and the lines so far). ``on_malformed="error"`` likewise fails at the first chunk with a
      malformed line.
    - ``unknown_common_feature_index``: skeleton lines whose common-features record is absent
      (rows dropped).
    - ``feature_count_mismatch``: lines whose ``feature_count`` differs from the number of
      features in the list (counted, rows kept: the count is informational).
    - ``unknown_field_features``: features whose field id is not an Ali-CCP field (feature
      dropped, row kept).
    - ``repeated_single_field_values``: ids dropped because a single field had more than one id
      in one impression (the first is kept; ids inherited from a common-features record count
      once per impression).
    - ``duplicate_rows``: kept rows whose content (labels and all fields, not ``sample_id``)
      repeats an earlier kept row of the same file (counted by a 64-bit content hash; kept).
    - ``blank_lines``: empty lines, skipped.
    - ``common_*``: the same for the common-features file; a repeated common_feature_index
      keeps its first record.
    """

    source_format: str
    path: str
    common_features_path: str | None = None
    output_path: str | None = None
    day: int = 0
    sample_id_type: str = ""
    lines_read: int = 0
    blank_lines: int = 0
    rows_kept: int = 0
    clicks: int = 0
    conversions: int = 0
    malformed: int = 0
    malformed_lines: list[tuple[int, str]] = field(default_factory=list)
    conversion_without_click: int = 0
    conversion_without_click_lines: list[int] = field(default_factory=list)
    conversion_without_click_policy: str = "drop"
    unknown_common_feature_index: int = 0
    unknown_common_feature_index_lines: list[int] = field(default_factory=list)
    feature_count_mismatch: int = 0
    feature_count_mismatch_lines: list[int] = field(default_factory=list)
    unknown_field_features: int = 0
    unknown_field_lines: list[int] = field(default_factory=list)
    repeated_single_field_values: int = 0
    duplicate_rows: int = 0
    duplicate_row_lines: list[int] = field(default_factory=list)
    common_lines_read: int = 0
    common_blank_lines: int = 0
    common_records: int = 0
    common_malformed: int = 0
    common_malformed_lines: list[tuple[int, str]] = field(default_factory=list)
    common_duplicate_index: int = 0
    common_duplicate_index_lines: list[int] = field(default_factory=list)
    common_feature_count_mismatch: int = 0
    common_feature_count_mismatch_lines: list[int] = field(default_factory=list)
    common_unknown_field_features: int = 0
    common_unknown_field_lines: list[int] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        data = asdict(self)
        for key in ("malformed_lines", "common_malformed_lines"):
            data[key] = [{"line": line, "reason": reason} for line, reason in data[key]]
        return data

    def summary(self) -> str:
        rate = self.lines_read / self.seconds if self.seconds > 0 else 0.0
        out = [
            f"Ali-CCP {self.source_format} file {self.path} (day {self.day})",
            f"  lines read: {self.lines_read:,} ({rate:,.0f} lines/s); rows kept: "
            f"{self.rows_kept:,}; clicks: {self.clicks:,}; conversions: {self.conversions:,}",
        ]
        if self.common_features_path is not None:
            out.append(
                f"  common features {self.common_features_path}: "
                f"{self.common_lines_read:,} lines, {self.common_records:,} records"
            )
        if self.output_path is not None:
            out.append(f"  written to {self.output_path}")

        def line(label: str, count: int, lines: list, note: str = "") -> None:
            if count:
                shown = ", ".join(
                    f"{x[0]} ({x[1]})" if isinstance(x, tuple) else str(x) for x in lines
                )
                more = ", ..." if count > len(lines) else ""
                out.append(f"  {label}: {count:,}{note} - lines {shown}{more}")

        line("malformed lines (dropped)", self.malformed, self.malformed_lines)
        line(
            "conversion=1 with click=0",
            self.conversion_without_click,
            self.conversion_without_click_lines,
            f" (policy {self.conversion_without_click_policy})",
        )
        line(
            "unknown common_feature_index (dropped)",
            self.unknown_common_feature_index,
            self.unknown_common_feature_index_lines,
        )
        line(
            "feature_count mismatch (kept)",
            self.feature_count_mismatch,
            self.feature_count_mismatch_lines,
        )
        line(
            "features of unknown fields (ignored)",
            self.unknown_field_features,
            self.unknown_field_lines,
        )
        line("duplicate rows (kept)", self.duplicate_rows, self.duplicate_row_lines)
        if self.repeated_single_field_values:
            out.append(
                f"  repeated single-field ids (first kept): {self.repeated_single_field_values:,}"
            )
        line(
            "common: malformed lines (dropped)", self.common_malformed, self.common_malformed_lines
        )
        line(
            "common: repeated common_feature_index (first kept)",
            self.common_duplicate_index,
            self.common_duplicate_index_lines,
        )
        line(
            "common: feature_count mismatch",
            self.common_feature_count_mismatch,
            self.common_feature_count_mismatch_lines,
        )
        line(
            "common: features of unknown fields (ignored)",
            self.common_unknown_field_features,
            self.common_unknown_field_lines,
        )
        if self.blank_lines or self.common_blank_lines:
            out.append(f"  blank lines skipped: {self.blank_lines + self.common_blank_lines:,}")
        return "\n".join(out)


# --------------------------------------------------------------------------- public readers


def read_aliccp_raw(
    skeleton_path: str | Path,
    common_features_path: str | Path,
    *,
    day: int = 0,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    conversion_without_click: ConversionPolicy = "drop",
    on_malformed: MalformedPolicy = "report",
    sample_id: SampleIdType = "auto",
    progress: bool = True,
    workers: int | None = None,
) -> tuple[pa.Table, AliccpReadReport]:
    """Read a raw Tianchi skeleton file and its common-features file into the canonical table.

    The skeleton file is read in chunks of about ``chunk_bytes``; the common-features file is
    held in memory as columnar per-field arrays. ``sample_id="auto"`` gives ``int64`` ids when
    the first chunk's ids are all integers of up to 18 digits (a later non-integer id is then
    malformed), else ``string``; ``"int64"`` or ``"string"`` force the type. Lines are
    validated (one regular expression per line) and then parsed from the bytes with numpy;
    only bad lines are split token by token to name their problem. See
    :class:`AliccpReadReport` for what is counted, dropped or raised.

    ``workers`` threads parse skeleton chunks in parallel (default: the cores this process may
    run on; 1 parses every chunk in the calling thread). The table, the report and the errors
    raised are the same for any ``workers``; at most ``workers + 1`` chunks are held at a time.
    """
    reader = _Reader(
        "raw",
        skeleton_path,
        common_features_path,
        day=day,
        chunk_bytes=chunk_bytes,
        cwc=conversion_without_click,
        on_malformed=on_malformed,
        sample_id=sample_id,
        progress=progress,
        workers=workers,
    )
    return reader.to_table()


def convert_aliccp_raw(
    skeleton_path: str | Path,
    common_features_path: str | Path,
    output_path: str | Path,
    *,
    day: int = 0,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    conversion_without_click: ConversionPolicy = "drop",
    on_malformed: MalformedPolicy = "report",
    sample_id: SampleIdType = "auto",
    progress: bool = True,
    workers: int | None = None,
) -> AliccpReadReport:
    """Stream a raw Ali-CCP skeleton file (with its common-features file) into a Parquet file.

    Each chunk becomes one or more row groups of a temporary file beside ``output_path``, which
    is renamed to ``output_path`` at the end; on any error the temporary file is removed and
    nothing is left under the final name. Memory is bounded by the chunk size (and a cap on the
    feature ids per row group) times the ``workers + 1`` chunks in flight, plus the
    common-features lookup and 8 bytes per distinct row (to count duplicates). The file's
    ``esmm`` schema metadata (:func:`esmm.data.table.read_parquet_metadata`) names the source
    and the field schema; the report is under the Parquet key-value metadata key
    :data:`REPORT_METADATA_KEY`.
    """
    reader = _Reader(
        "raw",
        skeleton_path,
        common_features_path,
        day=day,
        chunk_bytes=chunk_bytes,
        cwc=conversion_without_click,
        on_malformed=on_malformed,
        sample_id=sample_id,
        progress=progress,
        workers=workers,
    )
    return reader.to_parquet(output_path)


def read_paddlerec(
    path: str | Path,
    *,
    day: int = 0,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    conversion_without_click: ConversionPolicy = "drop",
    on_malformed: MalformedPolicy = "report",
    sample_id: SampleIdType = "auto",
    progress: bool = True,
    workers: int | None = None,
) -> tuple[pa.Table, AliccpReadReport]:
    """Read a PaddleRec ESMM text file (``sample_id,click,conversion,field:id,...``) into the
    canonical Ali-CCP table; fields absent from a line are null (single) or empty (multi).
    ``workers`` as for :func:`read_aliccp_raw`."""
    reader = _Reader(
        "paddlerec",
        path,
        None,
        day=day,
        chunk_bytes=chunk_bytes,
        cwc=conversion_without_click,
        on_malformed=on_malformed,
        sample_id=sample_id,
        progress=progress,
        workers=workers,
    )
    return reader.to_table()


# --------------------------------------------------------------------------- chunked lines


@dataclass
class _Lines:
    text: pa.Array  # one string per line, without the line break
    line_no: np.ndarray  # 1-based file line numbers
    non_ascii: np.ndarray  # bool: the line held a byte >= 0x80 (replaced by '?')


def _split_lines(chunk: bytes, first_line: int) -> _Lines:
    """Lines of ``chunk`` (which ends at a line break or at the end of the file) as a string
    array, split by Arrow without a Python loop."""
    raw = np.frombuffer(chunk, np.uint8)
    size = len(chunk) - 1 if chunk.endswith(b"\n") else len(chunk)
    non_ascii_bytes = len(raw) > 0 and int(raw.max()) >= 0x80
    if non_ascii_bytes:  # rare: mark the lines, make the bytes valid UTF-8
        high = np.flatnonzero(raw >= 0x80)
        line_of = np.searchsorted(np.flatnonzero(raw == 10), high)
        chunk = np.where(raw >= 0x80, np.uint8(ord("?")), raw).tobytes()
    whole = pa.LargeStringArray.from_buffers(
        1, pa.py_buffer(np.array([0, size], np.int64)), pa.py_buffer(chunk)
    )
    text = pc.split_pattern(whole, "\n").values
    if b"\r" in chunk:
        text = pc.ascii_rtrim(text, "\r")
    n = len(text)
    non_ascii = np.zeros(n, bool)
    if non_ascii_bytes:
        non_ascii[line_of] = True
    return _Lines(text, first_line + np.arange(n, dtype=np.int64), non_ascii)


@dataclass
class _Chunk:
    """A piece of a file cut at a line break, parsed on its own (possibly in another thread)."""

    data: bytes  # whole lines: ends at a line break or at the end of the file
    first_line: int  # 1-based file line number of its first line


def _iter_chunks(
    path: Path, chunk_bytes: int, advance: Callable[[int, int], None]
) -> Iterator[_Chunk]:
    """The file in chunks of about ``chunk_bytes``, cut at line breaks only. Lines are counted
    here (not split) so that the next chunk's first line number is known before this one is
    parsed, possibly in another thread."""
    line_no = 1
    carry = b""
    try:
        handle = open(path, "rb")  # noqa: SIM115 - closed by the with below
    except OSError as error:
        raise DataError(f"{path}: cannot be read: {error}") from error
    with handle:
        while True:
            block = handle.read(chunk_bytes)
            if not block:
                if carry:  # a last line without a line break
                    advance(0, 1)
                    yield _Chunk(carry, line_no)
                return
            data = carry + block if carry else block
            cut = data.rfind(b"\n")
            if cut < 0:
                carry = data
                advance(len(block), 0)
                continue
            chunk, carry = data[: cut + 1], data[cut + 1 :]
            n_lines = chunk.count(b"\n")
            advance(len(block), n_lines)
            yield _Chunk(chunk, line_no)
            line_no += n_lines


# --------------------------------------------------------------------------- small kernels


def _np(array: pa.Array | pa.ChunkedArray) -> np.ndarray:
    return array.to_numpy(zero_copy_only=False)


def _is_int64(strings: pa.Array) -> np.ndarray:
    """Non-empty strings of at most 18 ASCII digits (ids and labels; they always fit int64)."""
    if len(strings) == 0:
        return np.zeros(0, bool)
    short = pc.less_equal(pc.binary_length(strings), 18)
    return _np(pc.and_(pc.ascii_is_decimal(strings), short)).astype(bool)


def _to_int64(strings: pa.Array, ok: np.ndarray) -> np.ndarray:
    out = np.zeros(len(strings), np.int64)
    if ok.any():
        out[ok] = _np(pc.cast(strings.filter(pa.array(ok)), pa.int64()))
    return out


def _is_number(strings: pa.Array) -> np.ndarray:
    """Strings that are decimal numbers (``1``, ``0.693147``, ``-.5``, ``1e-3``)."""
    if len(strings) == 0:
        return np.zeros(0, bool)
    return _np(pc.match_substring_regex(strings, f"^{_NUMBER}$")).astype(bool)


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + n)`` for each (s, n)."""
    lengths = lengths.astype(np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    ends = np.cumsum(lengths)
    return np.repeat(starts.astype(np.int64) - (ends - lengths), lengths) + np.arange(total)


def _times(n: int, k: np.uint64) -> np.uint64:
    """``n * k`` modulo 2**64 (numpy warns on scalar overflow, arrays wrap silently)."""
    return np.uint64((n * int(k)) % (1 << 64))


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser over a uint64 array (wrapping arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _list_hash(
    ids: np.ndarray, counts: np.ndarray, field_index: int, seed: np.uint64 = _K5
) -> np.ndarray:
    """One uint64 per list (lists given as flat ``ids`` grouped by ``counts``): order-aware,
    0 for an empty list, equal for equal lists of the same field."""
    counts = counts.astype(np.int64)
    out = np.zeros(len(counts), np.uint64)
    if len(ids) == 0:
        return out
    ends = np.cumsum(counts)
    starts = ends - counts
    rank = np.arange(len(ids), dtype=np.int64) - np.repeat(starts, counts)
    entry = _mix(
        ids.astype(np.int64).view(np.uint64) * _K1
        + rank.view(np.uint64) * _K2
        + _times(field_index + 1, _K3)
        + seed
    )
    sums = np.concatenate(([np.uint64(0)], np.cumsum(entry, dtype=np.uint64)))
    return sums[ends] - sums[starts]


def _row_hash(field_hashes: list[np.ndarray], extra: np.ndarray | None) -> np.ndarray:
    total = np.zeros(len(field_hashes[0]), np.uint64)
    for f, h in enumerate(field_hashes):
        total = total + _mix(h + _times(f + 1, _K4))
    if extra is not None:
        total = total + _mix(extra.astype(np.uint64) + _K5)
    return _mix(total)


def _first_lines(target: list, line_no: np.ndarray) -> None:
    room = MAX_REPORTED_LINES - len(target)
    if room > 0 and len(line_no):
        target.extend(int(x) for x in line_no[:room])


# --------------------------------------------------------------------------- features


@dataclass
class _Features:
    """Parsed features of a set of lines, in line order."""

    parent: np.ndarray  # index of the owning line
    field: np.ndarray  # field index into ALICCP_FIELDS, -1 for an unknown field
    ids: np.ndarray  # int64 feature ids
    code: np.ndarray  # 0 or the malformed reason


def _parse_features(tokens: pa.Array, parent: np.ndarray, raw: bool) -> _Features:
    """``field\\x02id\\x03value`` (raw) or ``field:id`` (PaddleRec) tokens."""
    n = len(tokens)
    code = np.zeros(n, np.int8)
    field_index = np.full(n, -1, np.int64)
    ids = np.zeros(n, np.int64)
    if n == 0:
        return _Features(parent, field_index, ids, code)
    first_sep = "\x02" if raw else ":"
    split = pc.split_pattern(tokens, first_sep)
    offsets = _np(split.offsets).astype(np.int64)
    parts = np.diff(offsets)
    code[parts > 2] = _EXTRA_SEP_RAW if raw else _EXTRA_SEP_PADDLE
    code[parts == 1] = _NO_SEP1_RAW if raw else _NO_SEP_PADDLE
    good = np.flatnonzero(parts == 2)
    field_str = split.values.take(pa.array(offsets[good]))
    id_str = split.values.take(pa.array(offsets[good] + 1))
    if raw:
        split2 = pc.split_pattern(id_str, "\x03")
        offsets2 = _np(split2.offsets).astype(np.int64)
        parts2 = np.diff(offsets2)
        code[good[parts2 > 2]] = _EXTRA_SEP_RAW
        code[good[parts2 == 1]] = _NO_SEP2_RAW
        ok2 = parts2 == 2
        good = good[ok2]
        field_str = field_str.filter(pa.array(ok2))
        id_str = split2.values.take(pa.array(offsets2[:-1][ok2]))
        value_ok = _is_number(split2.values.take(pa.array(offsets2[:-1][ok2] + 1)))
        code[good[~value_ok]] = _BAD_VALUE
    id_ok = _is_int64(id_str)
    code[good[~id_ok]] = _BAD_ID
    code[good[_np(pc.binary_length(field_str)) == 0]] = _EMPTY_FIELD
    ids[good] = _to_int64(id_str, id_ok)
    field_index[good] = _np(pc.index_in(field_str, value_set=_FIELD_NAMES).fill_null(-1))
    return _Features(parent, field_index, ids, code)


def _string_buffers(strings: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(offsets as int64, data bytes) of a string array, zero-copy where possible."""
    _, offsets_buffer, data_buffer = strings.buffers()
    large = pa.types.is_large_string(strings.type)
    offsets = np.frombuffer(offsets_buffer, np.int64 if large else np.int32)
    offsets = offsets[strings.offset : strings.offset + len(strings) + 1].astype(np.int64)
    data = (
        np.frombuffer(data_buffer, np.uint8) if data_buffer is not None else np.zeros(0, np.uint8)
    )
    return offsets, data


@dataclass(frozen=True)
class _FieldTable:
    """Known field names found from the 8 bytes before a field separator, without a search.

    A known name of L bytes (L <= 7) is recognised when the L bytes before the separator are the
    name and the byte before them is a feature separator; the key is those L + 1 bytes
    (little-endian, L in the top byte), looked up in a 256-slot multiplicative hash table."""

    lengths: tuple[int, ...]
    multiplier: np.uint64
    keys: np.ndarray  # uint64 per slot, 0 where empty
    index: np.ndarray  # field index per slot

    @staticmethod
    def build(names: tuple[str, ...], separators: bytes) -> _FieldTable:
        lengths = tuple(sorted({len(name) for name in names}))
        assert lengths[-1] <= 7, "field names of up to 7 bytes fit a key"
        entries = {
            int.from_bytes(bytes([sep]) + name.encode(), "little") | (len(name) << 56): f
            for f, name in enumerate(names)
            for sep in separators
        }
        keys = np.array(list(entries), np.uint64)
        rng = np.random.default_rng(0)
        while True:  # a collision-free odd multiplier: a few tries for a few dozen keys
            multiplier = np.uint64(int(rng.integers(1, 1 << 62)) * 2 + 1)
            slots = (keys * multiplier) >> np.uint64(56)
            if len(np.unique(slots)) == len(keys):
                break
        table_keys = np.zeros(256, np.uint64)
        table_index = np.full(256, -1, np.int64)
        table_keys[slots] = keys
        table_index[slots] = list(entries.values())
        return _FieldTable(lengths, multiplier, table_keys, table_index)

    def lookup(self, words: np.ndarray) -> np.ndarray:
        """Field index (or -1) per word: the 8 bytes that end just before a field separator."""
        field = np.full(len(words), -1, np.int64)
        for length in self.lengths:
            key = (words >> np.uint64(8 * (7 - length))) | np.uint64(length << 56)
            slot = ((key * self.multiplier) >> np.uint64(56)).view(np.int64)
            field = np.where(self.keys[slot] == key, self.index[slot], field)
        return field


_RAW_FIELDS = _FieldTable.build(ALICCP_FIELDS, b"\x01,")
_PADDLE_FIELDS = _FieldTable.build(ALICCP_FIELDS, b",")
_LOW_BYTES = np.array([(1 << (8 * n)) - 1 for n in range(8)] + [(1 << 64) - 1], np.uint64)
# the low nibbles of the last ``count`` bytes of a word (index: count, 0-8)
_DIGIT_MASKS = np.array([~int(_LOW_BYTES[8 - n]) & 0x0F0F0F0F0F0F0F0F for n in range(9)], np.uint64)


def _words(data: np.ndarray, start: np.ndarray) -> np.ndarray:
    """The 8 bytes of ``data`` from each ``start`` as little-endian uint64; bytes outside
    ``data`` (``start`` from -7 to ``len(data) - 1``) read as 0. ``len(data) >= 8``.

    Gathered through an unaligned uint64 view of the bytes (stride 1): one indexed load per
    word."""
    view = np.ndarray((len(data) - 7,), "<u8", data, strides=(1,))
    if len(start) == 0 or (start.min() >= 0 and start.max() <= len(data) - 8):
        return view[start]
    at = np.clip(start, 0, len(data) - 8)
    words = view[at] >> (np.maximum(start - at, 0) * 8).astype(np.uint64)
    return words << (np.maximum(at - start, 0) * 8).astype(np.uint64)


def _eight_digits(words: np.ndarray, count: np.ndarray) -> np.ndarray:
    """The number written by the last ``count`` (0-8) bytes of each word (ASCII digits, first
    digit lowest), by SWAR arithmetic; the bytes before them count as 0."""
    words = words & _DIGIT_MASKS[count]
    words = (words * np.uint64(2561)) >> np.uint64(8)
    words = ((words & np.uint64(0x00FF00FF00FF00FF)) * np.uint64(6553601)) >> np.uint64(16)
    return ((words & np.uint64(0x0000FFFF0000FFFF)) * np.uint64(42949672960001)) >> np.uint64(32)


def _decimal_ids(data: np.ndarray, end: np.ndarray, digits: np.ndarray) -> np.ndarray:
    """The ids of 1 to 18 ASCII digits that end before each ``end``, eight digits at a time."""
    ids = _eight_digits(_words(data, end - 8), np.minimum(digits, 8)).astype(np.int64)
    for step in (1, 2):
        if (digits > 8 * step).any():  # usually all or none: no gather of a subset
            more = _eight_digits(
                _words(data, end - 8 * (step + 1)), np.clip(digits - 8 * step, 0, 8)
            )
            ids += more.astype(np.int64) * 10 ** (8 * step)
    return ids


def _tokenize(
    data: np.ndarray, starts: np.ndarray, ends: np.ndarray, raw: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features of well-formed feature lists ``data[starts[i]:ends[i]]`` (ascending, disjoint
    ranges), straight from the bytes: (list index, field index or -1, id) per feature.

    Raw lists are ``field\\x02id\\x03value`` joined by ``\\x01``; PaddleRec lists ``field:id``
    joined by ``,``. Only valid input is given (checked by a regular expression before), so each
    feature has exactly one field separator, and ids are 1 to 18 digits. Each separator is found
    with one pass over the bytes; fields and ids are read from the 8-byte words around it.
    """
    empty = np.zeros(0, np.int64)
    if len(starts) == 0 or not (ends > starts).any():
        return empty, empty, empty
    lo, hi = int(starts[0]), int(ends[-1])
    segment = data[lo:hi]

    def inside(byte: int) -> tuple[np.ndarray, np.ndarray]:
        """Positions of ``byte`` within the ranges, and how many each range holds."""
        at = np.flatnonzero(segment == byte) + lo
        first = np.searchsorted(at, starts)
        counts = np.searchsorted(at, ends) - first
        if counts.sum() != len(at):  # some in bytes between the ranges
            at = at[_ranges(first, counts)]
        return at, counts

    field_at, per_line = inside(2 if raw else ord(":"))
    n = len(field_at)
    if n == 0:
        return empty, empty, empty
    line = np.repeat(np.arange(len(starts)), per_line)
    if raw:
        id_end, _ = inside(3)
    else:  # an id ends at the next feature's ',' or at the list's end
        last = np.zeros(n, bool)
        last[np.cumsum(per_line)[per_line > 0] - 1] = True
        id_end = np.empty(n, np.int64)
        id_end[last] = ends[line[last]]
        id_end[~last] = inside(ord(","))[0]
    if len(data) < 8:
        data = np.concatenate((data, np.zeros(8, np.uint8)))
    field = (_RAW_FIELDS if raw else _PADDLE_FIELDS).lookup(_words(data, field_at - 8))
    return line, field, _decimal_ids(data, id_end, id_end - field_at - 1)


# --------------------------------------------------------------------------- the reader


@dataclass(frozen=True)
class _Layout:
    """One line format: its column count, where the features start, what to check."""

    columns: int  # columns of a line (the minimum where not exact)
    exact: bool
    head: int  # the feature list starts after this many commas
    labels: bool  # sample_id, click, conversion in columns 0-2
    index_column: int | None  # common_feature_index
    count_column: int | None  # feature_count
    raw: bool  # features ``field\x02id\x03value`` joined by \x01, else ``field:id`` by ','
    regex: str  # a well-formed line


_SKELETON = _Layout(6, True, 5, True, 3, 4, True, r"^(?:[^,]*,){5}" + _RAW_FEATURES)
_COMMON = _Layout(3, True, 2, False, 0, 1, True, r"^(?:[^,]*,){2}" + _RAW_FEATURES)
_PADDLEREC = _Layout(3, False, 3, True, None, None, False, r"^[^,]*,[^,]*,[^,]*" + _PADDLE_FEATURES)


@dataclass
class _Parsed:
    """Well-formed lines of one chunk."""

    line_no: np.ndarray
    sample_id: pa.Array | None  # strings
    click: np.ndarray | None  # int8
    conversion: np.ndarray | None  # int8
    index: pa.Array | None  # common_feature_index
    tok_row: np.ndarray  # per feature: row (ascending)
    tok_field: np.ndarray  # per feature: field index (known fields only)
    tok_id: np.ndarray  # per feature: id


@dataclass
class _Common:
    """The common-features lookup, columnar: record i has, for field f, the ids
    ``ids[f][offsets[f][i]:offsets[f][i + 1]]`` (None where no record has field f), and the
    same as an Arrow array of one value per record (``columns[f]``: a list for a multi field,
    an id or null for a single one) that Arrow's ``take`` copies to the rows of a chunk."""

    lookup: pd.Index  # each distinct common_feature_index once (its hash table is built once)
    first_record: np.ndarray  # the record each ``lookup`` entry names (its first occurrence)
    offsets: list[np.ndarray | None]
    ids: list[np.ndarray | None]
    columns: list[pa.Array | None]
    hashes: list[np.ndarray | None]
    repeats: list[np.ndarray | None]  # single fields: ids dropped per record

    def records(self, index: pa.Array) -> np.ndarray:
        """The record of each common_feature_index, -1 where there is none. A skeleton file
        is grouped by user, so only the first of each run of equal indexes is looked up
        (``pc.index_in`` would rebuild a hash set of all 730k indexes for every chunk)."""
        n = len(index)
        if n == 0:
            return np.zeros(0, np.int64)
        starts_run = np.ones(n, bool)
        starts_run[1:] = ~_np(pc.equal(index.slice(1), index.slice(0, n - 1))).astype(bool)
        heads = np.flatnonzero(starts_run)
        slot = self.lookup.get_indexer(_np(index.take(pa.array(heads))))
        record = np.where(slot >= 0, self.first_record[slot], -1)
        return np.repeat(record, np.diff(np.append(heads, n)))


@dataclass
class _ChunkResult:
    """One chunk of the main file, parsed: its batches and its counts, to be handed on in
    file order (the duplicate count needs the rows of every earlier chunk first)."""

    tally: AliccpReadReport  # the chunk's counts and first lines
    batches: list[pa.RecordBatch]
    content: np.ndarray  # per kept row: content hash (for the duplicate count)
    line_no: np.ndarray  # per kept row: file line number


# what a chunk's tally adds to the file's report (the duplicate count is kept by the reader)
_TALLIED = (
    "lines_read",
    "blank_lines",
    "rows_kept",
    "clicks",
    "conversions",
    "malformed",
    "malformed_lines",
    "conversion_without_click",
    "conversion_without_click_lines",
    "unknown_common_feature_index",
    "unknown_common_feature_index_lines",
    "feature_count_mismatch",
    "feature_count_mismatch_lines",
    "unknown_field_features",
    "unknown_field_lines",
    "repeated_single_field_values",
)


def _add_tally(report: AliccpReadReport, tally: AliccpReadReport) -> None:
    """Add a chunk's counts to the file's report. Tallies come in file order and each lists
    its chunk's first lines, so the report keeps the file's first :data:`MAX_REPORTED_LINES`."""
    for name in _TALLIED:
        value = getattr(tally, name)
        if isinstance(value, list):
            target = getattr(report, name)
            target.extend(value[: max(0, MAX_REPORTED_LINES - len(target))])
        else:
            setattr(report, name, getattr(report, name) + value)


def _available_cores() -> int:
    """Cores this process may run on (its CPU affinity where the platform has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


class _Progress:
    """A rich bar on stderr over bytes read, with lines and lines/s; a no-op when disabled."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._bar = None
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                ProgressColumn,
                Task,
                TextColumn,
                TimeRemainingColumn,
            )
            from rich.text import Text

            from esmm.progress import STDERR

            class LinesColumn(ProgressColumn):
                def render(self, task: Task) -> Text:
                    lines = task.fields.get("lines", 0)
                    speed = lines / task.elapsed if task.elapsed else 0.0
                    return Text(f"{lines:,} lines {speed:,.0f} lines/s")

            self._bar = self._stack.enter_context(
                Progress(
                    TextColumn("[bold]{task.description}"),
                    BarColumn(),
                    DownloadColumn(),
                    LinesColumn(),
                    TimeRemainingColumn(),
                    console=STDERR,
                    disable=not STDERR.is_terminal,
                    transient=True,
                )
            )
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def task(self, description: str, total: int) -> Callable[[int, int], None]:
        if self._bar is None:
            return lambda _bytes, _lines: None
        bar = self._bar
        task_id = bar.add_task(description, total=total, lines=0)
        count = [0]

        def advance(n_bytes: int, n_lines: int) -> None:
            count[0] += n_lines
            bar.update(task_id, advance=n_bytes, lines=count[0])

        return advance


class _Reader:
    def __init__(
        self,
        source_format: str,
        path: str | Path,
        common_path: str | Path | None,
        *,
        day: int,
        chunk_bytes: int,
        cwc: str,
        on_malformed: str,
        sample_id: str,
        progress: bool,
        workers: int | None,
    ) -> None:
        if cwc not in ("drop", "clear", "error"):
            raise ValueError(
                f"conversion_without_click must be 'drop', 'clear' or 'error', got {cwc!r}"
            )
        if on_malformed not in ("report", "error"):
            raise ValueError(f"on_malformed must be 'report' or 'error', got {on_malformed!r}")
        if sample_id not in ("auto", "int64", "string"):
            raise ValueError(f"sample_id must be 'auto', 'int64' or 'string', got {sample_id!r}")
        if int(chunk_bytes) < 1:
            raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
        if workers is not None and int(workers) < 1:
            raise ValueError(f"workers must be positive, got {workers}")
        self.raw = source_format == "raw"
        self.path = Path(path)
        self.common_path = None if common_path is None else Path(common_path)
        for p in (self.path, self.common_path):
            if p is not None and not p.is_file():
                raise DataError(f"{p}: " + ("not a file" if p.exists() else "file not found"))
        self.day = int(day)
        self.chunk_bytes = int(chunk_bytes)
        self.cwc = cwc
        self.on_malformed = on_malformed
        self.sample_id_type: str | None = None if sample_id == "auto" else sample_id
        self.progress = progress
        self.workers = _available_cores() if workers is None else int(workers)
        # one chunk more than the threads: a thread that finishes finds the next chunk read
        self.max_in_flight = self.workers + 1
        self.report = AliccpReadReport(
            source_format=source_format,
            path=str(self.path),
            common_features_path=None if self.common_path is None else str(self.common_path),
            day=self.day,
            conversion_without_click_policy=cwc,
        )
        self.schema: pa.Schema | None = None
        self._seen = np.zeros(0, np.uint64)
        self._start = 0.0

    # -- driving loops

    def to_table(self) -> tuple[pa.Table, AliccpReadReport]:
        batches = list(self._batches())
        return pa.Table.from_batches(batches, self.schema), self.report

    def to_parquet(self, output_path: str | Path) -> AliccpReadReport:
        output = Path(output_path)
        output.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temp_beside(output)
        writer: pq.ParquetWriter | None = None
        try:
            for batch in self._batches():
                if writer is None:
                    writer = pq.ParquetWriter(tmp, batch.schema.with_metadata(self._metadata()))
                writer.write_batch(batch)
            assert writer is not None  # _batches raises when no row is kept
            self.report.output_path = str(output)
            writer.add_key_value_metadata({REPORT_METADATA_KEY: json.dumps(self.report.to_dict())})
            writer.close()
            writer = None
            os.replace(tmp, output)
        except BaseException:
            if writer is not None:
                with contextlib.suppress(Exception):
                    writer.close()
            tmp.unlink(missing_ok=True)
            raise
        return self.report

    def _metadata(self) -> dict[str, str]:
        """The ``esmm`` schema metadata of a converted file (see ``read_parquet_metadata``)."""
        source = {
            "source": f"aliccp-{self.report.source_format}",
            "path": self.report.path,
            "common_features_path": self.report.common_features_path,
            "day": self.day,
            "schema": aliccp_schema().to_dict(),
        }
        return {"esmm": json.dumps(source)}

    def _batches(self) -> Iterator[pa.RecordBatch]:
        self._start = time.perf_counter()
        if self.path.stat().st_size == 0:
            raise DataError(f"{self.path}: the file is empty")
        with _Progress(self.progress) as bar:
            common = None
            if self.common_path is not None:
                common = self._load_common(bar)
            advance = bar.task(self.path.name, self.path.stat().st_size)
            chunks = _iter_chunks(self.path, self.chunk_bytes, advance)
            for done in self._chunk_results(chunks, common):
                _add_tally(self.report, done.tally)
                if done.batches and self.schema is None:
                    self.schema = done.batches[0].schema
                    self.report.sample_id_type = str(self.schema.field(SAMPLE_ID).type)
                self._duplicates(done.content, done.line_no)
                yield from done.batches
        report = self.report
        report.seconds = time.perf_counter() - self._start
        if report.lines_read == report.blank_lines:
            raise DataError(f"{self.path}: the file is empty ({report.lines_read} blank lines)")
        if report.rows_kept == 0:
            raise DataError(f"{self.path}: no valid rows\n{report.summary()}")

    def _chunk_results(
        self, chunks: Iterable[_Chunk], common: _Common | None
    ) -> Iterator[_ChunkResult]:
        """Each chunk parsed and assembled, in file order. ``sample_id="auto"`` takes its type
        from the first chunk with a candidate line and every later chunk is parsed with it, so
        chunks are parsed in this thread until the type is known, then by the threads."""
        chunks = iter(chunks)
        for chunk in chunks:
            if self.workers > 1 and self.sample_id_type is not None:
                yield from self._in_threads(itertools.chain((chunk,), chunks), common)
                return
            yield self._read_chunk(chunk, common)

    def _in_threads(
        self, chunks: Iterator[_Chunk], common: _Common | None
    ) -> Iterator[_ChunkResult]:
        """Chunks parsed by ``workers`` threads (the Arrow and numpy kernels release the GIL),
        results handed on in file order. At most ``max_in_flight`` chunks are read and not yet
        handed on: the file is read only as fast as the results are taken."""
        pending: deque[Future[_ChunkResult]] = deque()
        with ThreadPoolExecutor(self.workers, thread_name_prefix="aliccp") as pool:
            try:
                for chunk in chunks:
                    pending.append(pool.submit(self._read_chunk, chunk, common))
                    if len(pending) == self.max_in_flight:
                        yield pending.popleft().result()
                while pending:
                    yield pending.popleft().result()
            finally:  # an error or an abandoned read: start no more chunks
                for future in pending:
                    future.cancel()

    def _read_chunk(self, chunk: _Chunk, common: _Common | None) -> _ChunkResult:
        """Parse and assemble one chunk of the main file. It may run in a worker thread, so it
        counts into a tally of its own, added to the report in file order."""
        tally = AliccpReadReport(self.report.source_format, self.report.path)
        lines = _split_lines(chunk.data, chunk.first_line)
        rows = self._parse(lines, _SKELETON if self.raw else _PADDLEREC, tally)
        return self._assemble(rows, common, tally)

    # -- parsing

    def _malformed(
        self,
        report: AliccpReadReport,
        lines: _Lines,
        code: np.ndarray,
        detail: Callable[[int], str],
        common: bool = False,
    ) -> None:
        """Count the chunk's malformed lines, word the first few, raise if asked to."""
        bad = np.flatnonzero(code)
        if len(bad) == 0:
            return
        target = report.common_malformed_lines if common else report.malformed_lines
        for i in bad[: max(0, MAX_REPORTED_LINES - len(target))]:
            target.append((int(lines.line_no[i]), _REASONS[int(code[i])] + detail(int(i))))
        if common:
            report.common_malformed += len(bad)
        else:
            report.malformed += len(bad)
        if self.on_malformed == "error":
            path = self.common_path if common else self.path
            shown = [
                f"line {int(lines.line_no[i])}: {_REASONS[int(code[i])]}{detail(int(i))}"
                for i in bad[:MAX_REPORTED_LINES]
            ]
            more = "; ..." if len(bad) > MAX_REPORTED_LINES else ""
            raise DataError(
                f"{path}: {len(bad)} malformed lines in lines {int(lines.line_no[0])}-"
                f"{int(lines.line_no[-1])} (on_malformed='error'): " + "; ".join(shown) + more
            )

    def _parse(
        self, lines: _Lines, layout: _Layout, report: AliccpReadReport, common: bool = False
    ) -> _Parsed:
        """Check and parse one chunk of lines. Malformed lines are counted in ``report`` (or
        raise); the result holds the well-formed lines only."""
        n = len(lines.line_no)
        text_offsets, data = _string_buffers(lines.text)
        line_length = np.diff(text_offsets)
        blank = line_length == 0
        if common:
            report.common_lines_read += n
            report.common_blank_lines += int(blank.sum())
        else:
            report.lines_read += n
            report.blank_lines += int(blank.sum())
        # the feature list stays one piece where features are comma-separated (PaddleRec)
        lists = pc.split_pattern(lines.text, ",", max_splits=None if layout.raw else layout.head)
        offsets = _np(lists.offsets).astype(np.int64)
        counts = np.diff(offsets)
        pieces = lists.values
        piece_offsets, _ = _string_buffers(pieces)
        code = np.zeros(n, np.int8)
        wrong = (counts != layout.columns) if layout.exact else (counts < layout.columns)
        code[wrong & ~blank] = _BAD_COLUMNS
        code[lines.non_ascii] = _NON_ASCII
        cand = np.flatnonzero((code == 0) & ~blank)

        def column(k: int) -> pa.Array:
            return pieces.take(pa.array(offsets[cand] + k))

        sample_id, click, conversion, index = None, None, None, None
        if layout.labels:
            sample_id, click, conversion = self._labels(code, cand, column)
        if layout.index_column is not None:
            index = column(layout.index_column)
            code[cand[_np(pc.binary_length(index)) == 0]] = _EMPTY_INDEX

        # Well-formed feature lists are tokenised from the bytes; the others are diagnosed.
        well_formed = _np(pc.match_substring_regex(lines.text, layout.regex)).astype(bool)
        fast = cand[well_formed[cand]]
        has = counts[fast] > layout.head
        at = np.minimum(offsets[fast] + layout.head, len(piece_offsets) - 1)
        within = piece_offsets[at] - piece_offsets[offsets[fast]] + layout.head
        starts = text_offsets[fast] + np.where(has, within, line_length[fast])
        tok_line, tok_field, tok_id = _tokenize(data, starts, text_offsets[fast + 1], layout.raw)
        n_tokens = np.zeros(n, np.int64)
        n_tokens[fast] = np.bincount(tok_line, minlength=len(fast))
        first_bad = np.full(n, -1, np.int64)
        slow = cand[~well_formed[cand]]
        slow_tokens = pa.array([], pa.string())
        if len(slow):
            slow_tokens, parent = self._slow_tokens(pieces, offsets, counts, slow, layout)
            feats = _parse_features(slow_tokens, parent, layout.raw)
            bad_tokens = np.flatnonzero(feats.code)
            owners, first = np.unique(parent[bad_tokens], return_index=True)
            fresh = code[slow[owners]] == 0
            code[slow[owners[fresh]]] = feats.code[bad_tokens[first[fresh]]]
            first_bad[slow[owners[fresh]]] = bad_tokens[first[fresh]]
            code[slow[code[slow] == 0]] = _BAD_LIST  # a problem no token check names
        mismatch = np.zeros(len(cand), bool)
        if layout.count_column is not None:
            strings = column(layout.count_column)
            numeric = _is_int64(strings)
            code[cand[~numeric]] = _BAD_COUNT
            mismatch = numeric & (_to_int64(strings, numeric) != n_tokens[cand])

        qualifier = "" if layout.exact else "at least "

        def detail(i: int) -> str:
            if first_bad[i] >= 0:
                token = slow_tokens[int(first_bad[i])].as_py()
                return f" in feature {token[:60]!r}"
            if code[i] == _BAD_COLUMNS:
                return f": {counts[i]} columns, {qualifier}{layout.columns} expected"
            return ""

        self._malformed(report, lines, code, detail, common)

        keep = code[cand] == 0
        kept = cand[keep]
        line_no = lines.line_no[kept]
        mismatch &= keep
        if mismatch.any():
            if common:
                report.common_feature_count_mismatch += int(mismatch.sum())
                _first_lines(
                    report.common_feature_count_mismatch_lines, lines.line_no[cand[mismatch]]
                )
            else:
                report.feature_count_mismatch += int(mismatch.sum())
                _first_lines(report.feature_count_mismatch_lines, lines.line_no[cand[mismatch]])
        row_of = np.full(n, -1, np.int64)
        row_of[kept] = np.arange(len(kept))
        tok_row = row_of[fast[tok_line]]
        use = tok_row >= 0
        unknown = use & (tok_field < 0)
        if unknown.any():
            owners = line_no[np.unique(tok_row[unknown])]
            if common:
                report.common_unknown_field_features += int(unknown.sum())
                _first_lines(report.common_unknown_field_lines, owners)
            else:
                report.unknown_field_features += int(unknown.sum())
                _first_lines(report.unknown_field_lines, owners)
            use &= tok_field >= 0
        mask = pa.array(keep)
        return _Parsed(
            line_no=line_no,
            sample_id=None if sample_id is None else sample_id.filter(mask),
            click=None if click is None else click[keep],
            conversion=None if conversion is None else conversion[keep],
            index=None if index is None else index.filter(mask),
            tok_row=tok_row[use],
            tok_field=tok_field[use],
            tok_id=tok_id[use],
        )

    @staticmethod
    def _slow_tokens(
        pieces: pa.Array, offsets: np.ndarray, counts: np.ndarray, rows: np.ndarray, layout: _Layout
    ) -> tuple[pa.Array, np.ndarray]:
        """The feature strings of a few lines, split by Arrow: (tokens, owning row position)."""
        has = counts[rows] > layout.head
        lists = pieces.take(pa.array(offsets[rows[has]] + layout.head))
        split = pc.split_pattern(lists, "\x01" if layout.raw else ",")
        per_list = np.diff(_np(split.offsets).astype(np.int64))
        parent = np.repeat(np.flatnonzero(has), per_list)
        if not layout.raw:  # every piece after a comma is a feature, even an empty one
            return split.values, parent
        keep = np.repeat(_np(pc.binary_length(lists)) > 0, per_list)  # "" holds no feature
        return split.values.filter(pa.array(keep)), parent[keep]

    def _labels(
        self, code: np.ndarray, cand: np.ndarray, column: Callable[[int], pa.Array]
    ) -> tuple[pa.Array, np.ndarray, np.ndarray]:
        """sample_id, click, conversion of the candidate lines; bad ones get a code."""
        sample_id = column(0)
        labels = []
        for k in (1, 2):
            strings = column(k)
            numeric = _is_int64(strings)
            value = _to_int64(strings, numeric)
            code[cand[~numeric]] = _BAD_LABEL
            code[cand[numeric & (value != 0) & (value != 1)]] = _LABEL_RANGE
            labels.append(value.astype(np.int8))
        if self.sample_id_type is None and len(cand):
            self.sample_id_type = "int64" if _is_int64(sample_id).all() else "string"
        if self.sample_id_type == "int64":
            code[cand[~_is_int64(sample_id)]] = _BAD_SAMPLE_ID
        code[cand[_np(pc.binary_length(sample_id)) == 0]] = _EMPTY_SAMPLE_ID
        return sample_id, labels[0], labels[1]

    # -- common features

    def _load_common(self, bar: _Progress) -> _Common:
        path = self.common_path
        assert path is not None
        if path.stat().st_size == 0:
            raise DataError(f"{path}: the file is empty")
        report = self.report
        advance = bar.task(path.name, path.stat().st_size)
        index_parts: list[pa.Array] = []
        lengths: list[list[np.ndarray]] = [[] for _ in ALICCP_FIELDS]
        id_parts: list[list[np.ndarray]] = [[] for _ in ALICCP_FIELDS]
        hash_parts: list[list[np.ndarray]] = [[] for _ in ALICCP_FIELDS]
        repeat_parts: list[list[np.ndarray]] = [[] for _ in ALICCP_FIELDS]
        first_lines: list[np.ndarray] = []
        for chunk in _iter_chunks(path, self.chunk_bytes, advance):
            lines = _split_lines(chunk.data, chunk.first_line)
            parsed = self._parse(lines, _COMMON, report, common=True)
            row, fld, ids = parsed.tok_row, parsed.tok_field, parsed.tok_id
            assert parsed.index is not None
            n_rec = len(parsed.line_no)
            index_parts.append(parsed.index)
            first_lines.append(parsed.line_no)
            for f, (rows_f, ids_f, dropped) in enumerate(_by_field(row, fld, ids)):
                counts_f = np.bincount(rows_f, minlength=n_rec)
                lengths[f].append(counts_f)
                id_parts[f].append(ids_f)
                hash_parts[f].append(_list_hash(ids_f, counts_f, f))
                repeat_parts[f].append(np.bincount(dropped, minlength=n_rec).astype(np.int32))
        index_all = pa.concat_arrays(index_parts) if index_parts else pa.array([], pa.string())
        n = len(index_all)
        report.common_records = n
        if n == 0:
            raise DataError(f"{path}: no valid common-feature records\n{report.summary()}")
        first = _np(pc.index_in(index_all, value_set=index_all))
        duplicate = first != np.arange(n)
        if duplicate.any():
            report.common_duplicate_index = int(duplicate.sum())
            _first_lines(
                report.common_duplicate_index_lines, np.concatenate(first_lines)[duplicate]
            )
        import pandas as pd  # imported here: only raw Ali-CCP reading needs it

        distinct = np.flatnonzero(~duplicate)
        lookup = pd.Index(_np(index_all.take(pa.array(distinct))))
        lookup.get_indexer(lookup[:1])  # builds its hash table now, not racing in two threads
        common = _Common(lookup, distinct, [], [], [], [], [])
        for f in range(_N_FIELDS):
            length = np.concatenate(lengths[f]) if lengths[f] else np.zeros(n, np.int64)
            if not length.any():
                parts = (common.offsets, common.ids, common.columns, common.hashes, common.repeats)
                for part in parts:
                    part.append(None)
                continue
            ids_f = np.concatenate(id_parts[f])
            if len(ids_f) and ids_f.min() >= 0 and ids_f.max() < (1 << 31):
                ids_f = ids_f.astype(np.int32)  # halves the lookup's memory
            offsets = np.concatenate(([0], np.cumsum(length)))
            common.offsets.append(offsets)
            common.ids.append(ids_f)
            common.columns.append(_record_column(f, offsets, ids_f))
            common.hashes.append(np.concatenate(hash_parts[f]))
            repeats = np.concatenate(repeat_parts[f])
            common.repeats.append(repeats if repeats.any() else None)
        return common

    # -- assembly

    def _assemble(
        self, rows: _Parsed, common: _Common | None, report: AliccpReadReport
    ) -> _ChunkResult:
        """A chunk's well-formed lines as record batches, with user fields from the
        common-feature records; counts go to ``report`` (the chunk's tally)."""
        assert rows.sample_id is not None and rows.click is not None
        assert rows.conversion is not None
        m = len(rows.line_no)
        cwc = (rows.conversion == 1) & (rows.click == 0)
        keep = np.ones(m, bool)
        if cwc.any():
            report.conversion_without_click += int(cwc.sum())
            _first_lines(report.conversion_without_click_lines, rows.line_no[cwc])
            if self.cwc == "error":
                raise DataError(
                    f"{self.path}: {report.conversion_without_click} lines with conversion=1 and "
                    f"click=0 (conversion_without_click='error'); first lines "
                    f"{report.conversion_without_click_lines}"
                )
            if self.cwc == "drop":
                keep &= ~cwc
            else:
                rows.conversion = np.where(cwc, np.int8(0), rows.conversion)
        record = None
        if common is not None:
            assert rows.index is not None
            record = common.records(rows.index)
            unknown = record < 0
            if unknown.any():
                report.unknown_common_feature_index += int(unknown.sum())
                _first_lines(report.unknown_common_feature_index_lines, rows.line_no[unknown])
                keep &= ~unknown
                record = np.maximum(record, 0)
        if not keep.all():
            record = None if record is None else record[keep]
            tok_keep = keep[rows.tok_row]
            new_row = np.cumsum(keep) - 1
            rows = _Parsed(
                line_no=rows.line_no[keep],
                sample_id=rows.sample_id.filter(pa.array(keep)),
                click=rows.click[keep],
                conversion=rows.conversion[keep],
                index=None,
                tok_row=new_row[rows.tok_row[tok_keep]],
                tok_field=rows.tok_field[tok_keep],
                tok_id=rows.tok_id[tok_keep],
            )
            m = len(rows.line_no)
        if m == 0:
            return _ChunkResult(report, [], np.zeros(0, np.uint64), rows.line_no)
        schema = _table_schema(self.sample_id_type == "int64")
        sample_ids = rows.sample_id
        if self.sample_id_type == "int64":
            sample_ids = pc.cast(sample_ids, pa.int64())

        # Per field: the skeleton's ids (rows ascending) and, where it has none, the common's.
        columns: list[_FieldColumn] = []
        hashes = []
        for f, (rows_f, ids_f, dropped) in enumerate(
            _by_field(rows.tok_row, rows.tok_field, rows.tok_id)
        ):
            report.repeated_single_field_values += len(dropped)
            col = _FieldColumn(f, rows_f, ids_f, np.bincount(rows_f, minlength=m))
            row_hash = _list_hash(ids_f, col.skel_counts, f)
            if common is not None and common.offsets[f] is not None:
                assert record is not None
                col.record = record
                col.common_offsets = common.offsets[f]
                col.common_ids = common.ids[f]
                col.common_column = common.columns[f]
                from_common = col.skel_counts == 0
                starts = col.common_offsets[record]
                col.common_counts = np.where(
                    from_common, col.common_offsets[record + 1] - starts, 0
                )
                row_hash = np.where(from_common, common.hashes[f][record], row_hash)
                if common.repeats[f] is not None:
                    report.repeated_single_field_values += int(
                        common.repeats[f][record][from_common].sum()
                    )
            columns.append(col)
            hashes.append(row_hash)

        content = _row_hash(hashes, rows.click.astype(np.int64) * 2 + rows.conversion)
        report.rows_kept += m
        report.clicks += int(rows.click.sum())
        report.conversions += int(rows.conversion.sum())

        per_row = sum(col.lengths() for col in columns)
        cum = np.cumsum(per_row)
        batches = []
        start = 0
        while start < m:
            base = cum[start - 1] if start else 0
            end = max(int(np.searchsorted(cum, base + _MAX_BATCH_IDS, side="right")), start + 1)
            arrays = [
                sample_ids.slice(start, end - start),
                pa.array(rows.click[start:end], pa.int8()),
                pa.array(rows.conversion[start:end], pa.int8()),
                pa.array(np.full(end - start, self.day, np.int64)),
            ]
            arrays.extend(col.build(start, end) for col in columns)
            batches.append(pa.RecordBatch.from_arrays(arrays, schema=schema))
            start = end
        return _ChunkResult(report, batches, content, rows.line_no)

    def _duplicates(self, content: np.ndarray, line_no: np.ndarray) -> None:
        """Count rows whose content hash was seen earlier in the file (this chunk or before).
        The hashes seen are kept sorted: 8 bytes per distinct row."""
        if len(content) == 0:
            return
        unique, first, inverse = np.unique(content, return_index=True, return_inverse=True)
        seen = self._seen
        if len(seen):
            found = seen[np.minimum(np.searchsorted(seen, unique), len(seen) - 1)] == unique
        else:
            found = np.zeros(len(unique), bool)
        inverse = inverse.reshape(-1)
        repeated = (first[inverse] != np.arange(len(content))) | found[inverse]
        if repeated.any():
            self.report.duplicate_rows += int(repeated.sum())
            _first_lines(self.report.duplicate_row_lines, line_no[repeated])
        # two sorted runs: the stable sort (timsort) merges them in linear time
        self._seen = np.sort(np.concatenate((seen, unique[~found])), kind="stable")


def _record_column(f: int, offsets: np.ndarray, ids: np.ndarray) -> pa.Array:
    """Field ``f`` of the common-feature records as one Arrow value per record (sharing
    ``ids``' memory for a multi field)."""
    if not _IS_MULTI[f]:
        values = np.zeros(len(offsets) - 1, np.int64)
        has = offsets[1:] > offsets[:-1]
        values[has] = ids  # a single field keeps one id per record
        return pa.array(values, pa.int64(), mask=~has)
    if offsets[-1] < (1 << 31):
        return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(ids))
    return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(ids))


def _by_field(
    row: np.ndarray, fld: np.ndarray, ids: np.ndarray
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per field index: (rows ascending, ids, rows of dropped ids) where a single field keeps
    the first id of each row."""
    # a stable radix sort on a small key: rows stay ascending and in line order per field
    order = np.argsort(fld.astype(np.int8), kind="stable")
    fld_sorted = fld[order]
    bounds = np.searchsorted(fld_sorted, np.arange(_N_FIELDS + 1))
    for f in range(_N_FIELDS):
        sel = order[bounds[f] : bounds[f + 1]]
        rows_f, ids_f = row[sel], ids[sel]
        dropped = np.zeros(0, np.int64)
        if not _IS_MULTI[f] and len(rows_f) > 1:
            first = np.concatenate(([True], rows_f[1:] != rows_f[:-1]))
            if not first.all():
                dropped = rows_f[~first]
                rows_f, ids_f = rows_f[first], ids_f[first]
        yield rows_f, ids_f, dropped


@dataclass
class _FieldColumn:
    """One field of a chunk's rows: skeleton ids plus, for rows without them, common ids."""

    f: int
    skel_rows: np.ndarray
    skel_ids: np.ndarray
    skel_counts: np.ndarray
    record: np.ndarray | None = None
    common_offsets: np.ndarray | None = None
    common_ids: np.ndarray | None = None
    common_counts: np.ndarray | None = None
    common_column: pa.Array | None = None

    def lengths(self) -> np.ndarray:
        if self.common_counts is None:
            return self.skel_counts
        return self.skel_counts + self.common_counts

    def build(self, start: int, end: int) -> pa.Array:
        if self.common_column is not None and len(self.skel_rows) == 0:
            # the usual case for a user field: every row's ids are its record's
            assert self.record is not None
            values = self.common_column.take(pa.array(self.record[start:end]))
            wanted = pa.list_(pa.int64()) if _IS_MULTI[self.f] else pa.int64()
            return values if values.type == wanted else pc.cast(values, wanted)
        n = end - start
        lo, hi = np.searchsorted(self.skel_rows, [start, end])
        rows = self.skel_rows[lo:hi] - start
        ids = self.skel_ids[lo:hi]
        lengths = self.lengths()[start:end]
        from_common = np.zeros(0, np.int64)
        src = np.zeros(0, np.int64)
        if self.common_counts is not None:
            assert self.record is not None and self.common_offsets is not None
            counts = self.common_counts[start:end]
            from_common = np.flatnonzero(counts)
            src_starts = self.common_offsets[self.record[start:end][from_common]]
            src = _ranges(src_starts, counts[from_common])
        if not _IS_MULTI[self.f]:
            values = np.zeros(n, np.int64)
            values[rows] = ids
            if len(from_common):
                assert self.common_ids is not None
                values[from_common] = self.common_ids[src]
            valid = lengths > 0
            return pa.array(values, pa.int64(), mask=~valid)
        offsets = np.zeros(n + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        values = np.zeros(int(offsets[-1]), np.int64)
        if len(rows):
            counts = self.skel_counts[start:end]
            rank = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)
            values[offsets[rows] + rank] = ids
        if len(from_common):
            assert self.common_ids is not None and self.common_counts is not None
            dest = _ranges(offsets[from_common], self.common_counts[start:end][from_common])
            values[dest] = self.common_ids[src]
        return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values))


def _temp_beside(path: Path) -> Path:
    """A new empty file ``.<name>.<random>.tmp`` in ``path``'s folder (default permissions)."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            tmp.open("xb").close()
            return tmp
        except FileExistsError:
            continue


def _table_schema(int_sample_id: bool) -> pa.Schema:
    return pa.schema(
        [
            pa.field(SAMPLE_ID, pa.int64() if int_sample_id else pa.string()),
            pa.field(CLICK, pa.int8()),
            pa.field(CONVERSION, pa.int8()),
            pa.field(DAY, pa.int64()),
            *(
                pa.field(name, pa.list_(pa.int64()) if name in ALICCP_MULTI_FIELDS else pa.int64())
                for name in ALICCP_FIELDS
            ),
        ]
    )


# --------------------------------------------------------------------------- the writer


def write_aliccp_raw(
    table: pa.Table, skeleton_path: str | Path, common_features_path: str | Path
) -> tuple[Path, Path]:
    """Write a canonical Ali-CCP table as a raw Tianchi skeleton file and common-features file.

    Rows are grouped by the values of their user fields (:data:`ALICCP_USER_FIELDS`) into
    common-feature records, in order of first appearance; a record's index is 16 hex characters
    from a hash of those values, so equal users get equal indexes in every file. Item,
    combination and context fields go on the skeleton line. Feature values are written as
    ``1.0`` (the reader ignores them). ``sample_id`` is written as is (row numbers from 1 when
    absent). Fields absent from ``table`` are written as absent; ``day`` and other columns are
    not written. Labels must be 0 or 1 and ids in [0, 10**18). Both files are written through
    temporary files and renamed, so neither is ever half-written under its final name.
    Reading the files back with :func:`read_aliccp_raw` gives the same rows in the same order.
    """
    skeleton_path, common_features_path = Path(skeleton_path), Path(common_features_path)
    source = f"table written to {skeleton_path}"
    missing = [c for c in (CLICK, CONVERSION) if c not in table.column_names]
    if missing:
        raise DataError(f"{source}: missing columns {missing}")
    n = table.num_rows
    if n == 0:
        raise DataError(f"{source}: the table is empty")

    entries = [_column_entries(table, f, source) for f in range(_N_FIELDS)]
    # group rows by their user fields (two independent 64-bit hashes)
    user = [f for f in range(_N_FIELDS) if _IS_USER[f]]
    keys = []
    for seed in (_K5, _K4):
        keys.append(
            _row_hash(
                [
                    _list_hash(entries[f][1], np.bincount(entries[f][0], minlength=n), f, seed)
                    for f in user
                ],
                None,
            )
        )
    _, first, inverse = np.unique(
        np.stack(keys, axis=1), axis=0, return_index=True, return_inverse=True
    )
    inverse = inverse.reshape(-1)
    order = np.argsort(first)  # groups by first appearance
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    group = rank[inverse]
    representative = first[order]
    n_groups = len(representative)
    group_hash = keys[0][representative]
    if len(np.unique(group_hash)) < n_groups:  # 64-bit collision: fall back to numbering
        group_hash = np.arange(n_groups, dtype=np.uint64)
    index = _hex16(group_hash)

    # common-features records: the user fields of each group's first row
    is_rep = np.zeros(n, bool)
    is_rep[representative] = True
    common_rows, common_fields, common_ids = [], [], []
    for f in user:
        rows_f, ids_f = entries[f]
        sel = is_rep[rows_f]
        common_rows.append(group[rows_f[sel]])
        common_fields.append(np.full(int(sel.sum()), f, np.int64))
        common_ids.append(ids_f[sel])
    common_text = _raw_lines(
        [index],
        *_sorted_entries(common_rows, common_fields, common_ids),
        n_lines=n_groups,
    )

    if SAMPLE_ID in table.column_names:
        sample_id = table[SAMPLE_ID].combine_chunks()
        if sample_id.null_count:
            raise DataError(f"{source}: column '{SAMPLE_ID}' has {sample_id.null_count} nulls")
        sample_id = pc.cast(sample_id, pa.string())
        bad = _np(pc.match_substring_regex(sample_id, r"[,\r\n]|^$")).astype(bool)
        if bad.any():
            raise DataError(
                f"{source}: {int(bad.sum())} sample_id values are empty or hold ',' or a line "
                f"break (first rows {np.flatnonzero(bad)[:5].tolist()})"
            )
    else:
        sample_id = pc.cast(pa.array(np.arange(1, n + 1)), pa.string())
    labels = []
    for name in (CLICK, CONVERSION):
        column = table[name].combine_chunks()
        values = _np(column.fill_null(-1)) if column.null_count else _np(column)
        bad = ~np.isin(values, (0, 1))
        if bad.any():
            raise DataError(
                f"{source}: column '{name}' has {int(bad.sum())} values that are null or "
                f"outside {{0,1}} (first rows {np.flatnonzero(bad)[:5].tolist()})"
            )
        labels.append(pc.cast(pa.array(values.astype(np.int8)), pa.string()))
    skel_rows, skel_fields, skel_ids = _sorted_entries(
        [entries[f][0] for f in range(_N_FIELDS) if not _IS_USER[f]],
        [np.full(len(entries[f][0]), f, np.int64) for f in range(_N_FIELDS) if not _IS_USER[f]],
        [entries[f][1] for f in range(_N_FIELDS) if not _IS_USER[f]],
    )

    temps: list[Path] = []
    try:
        for path in (skeleton_path, common_features_path):
            path.parent.mkdir(parents=True, exist_ok=True)
            temps.append(_temp_beside(path))
        with open(temps[0], "wb") as handle:
            for start in range(0, n, _WRITE_ROWS):
                end = min(n, start + _WRITE_ROWS)
                lo, hi = np.searchsorted(skel_rows, [start, end])
                handle.write(
                    _raw_lines(
                        [
                            sample_id.slice(start, end - start),
                            *(label.slice(start, end - start) for label in labels),
                            index.take(pa.array(group[start:end])),
                        ],
                        skel_rows[lo:hi] - start,
                        skel_fields[lo:hi],
                        skel_ids[lo:hi],
                        n_lines=end - start,
                    )
                )
        with open(temps[1], "wb") as handle:
            handle.write(common_text)
        for tmp, path in zip(temps, (skeleton_path, common_features_path), strict=True):
            os.replace(tmp, path)
    except BaseException:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
        raise
    return skeleton_path, common_features_path


def _column_entries(table: pa.Table, f: int, source: str) -> tuple[np.ndarray, np.ndarray]:
    """(row, id) pairs of field ``f`` in row order; nothing if the column is absent."""
    name = ALICCP_FIELDS[f]
    if name not in table.column_names:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    column = table[name].combine_chunks()
    if _IS_MULTI[f]:
        if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)) or not (
            pa.types.is_integer(column.type.value_type)
        ):
            raise DataError(f"{source}: column '{name}' has type {column.type}, not a list of ints")
        lengths = _np(pc.list_value_length(column).fill_null(0)).astype(np.int64)
        values = pc.list_flatten(column)
        if values.null_count:
            raise DataError(f"{source}: column '{name}' has {values.null_count} null ids in lists")
        rows, ids = np.repeat(np.arange(len(column)), lengths), _np(values).astype(np.int64)
    else:
        if not pa.types.is_integer(column.type):
            raise DataError(f"{source}: column '{name}' has type {column.type}, not integer ids")
        valid = _np(column.is_valid()).astype(bool)
        rows, ids = np.flatnonzero(valid), _np(column.fill_null(0)).astype(np.int64)[valid]
    bad = (ids < 0) | (ids >= 10**18)
    if bad.any():
        raise DataError(
            f"{source}: column '{name}' has {int(bad.sum())} ids outside [0, 10**18) (first rows "
            f"{rows[bad][:5].tolist()}); raw Ali-CCP ids are 1 to 18 decimal digits"
        )
    return rows, ids


def _sorted_entries(
    rows: list[np.ndarray], fields: list[np.ndarray], ids: list[np.ndarray]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Concatenate per-field entries (given in field order) and order them by row, keeping the
    field order and the order within each list."""
    row = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    fld = np.concatenate(fields) if fields else np.zeros(0, np.int64)
    val = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    order = np.argsort(row, kind="stable")
    return row[order], fld[order], val[order]


_FEATURE_PREFIX = pa.array([f"{name}\x02" for name in ALICCP_FIELDS], pa.string())


def _raw_lines(
    leading: list[pa.Array], rows: np.ndarray, fields: np.ndarray, ids: np.ndarray, n_lines: int
) -> memoryview:
    """Lines ``leading...,feature_count,feature_list\\n`` as bytes; features are
    ``field\\x02id\\x031.0`` joined by ``\\x01``; (rows, fields, ids) sorted by row."""
    tokens = pc.binary_join_element_wise(
        _FEATURE_PREFIX.take(pa.array(fields, pa.int64())),
        pc.cast(pa.array(ids, pa.int64()), pa.string()),
        "\x031.0",
        "",
    )
    counts = np.bincount(rows, minlength=n_lines).astype(np.int64)
    offsets = np.concatenate(([0], np.cumsum(counts)))
    lists = pa.LargeListArray.from_arrays(pa.array(offsets), tokens.cast(pa.large_string()))
    feature_list = pc.binary_join(lists, pa.scalar("\x01", pa.large_string()))
    count = pc.cast(pa.array(counts), pa.string())
    columns = [pc.cast(c, pa.large_string()) for c in (*leading, count)]
    comma, newline, empty = (pa.scalar(x, pa.large_string()) for x in (",", "\n", ""))
    lines = pc.binary_join_element_wise(*columns, feature_list, comma)
    lines = pc.binary_join_element_wise(lines, empty, newline)
    value_offsets, data = _string_buffers(lines)
    start, end = int(value_offsets[0]), int(value_offsets[-1])
    return memoryview(data[start:end])


def _hex16(values: np.ndarray) -> pa.Array:
    """uint64 values as 16 lowercase hex characters each, without a per-value Python loop."""
    digits = np.frombuffer(b"0123456789abcdef", np.uint8)
    as_bytes = values.astype(">u8").view(np.uint8).reshape(-1, 8)
    nibbles = np.stack((as_bytes >> 4, as_bytes & 15), axis=2).reshape(-1, 16)
    data = digits[nibbles].reshape(-1)
    offsets = np.arange(0, 16 * len(values) + 1, 16, dtype=np.int32)
    return pa.StringArray.from_buffers(len(values), pa.py_buffer(offsets), pa.py_buffer(data))
