"""The canonical impression table: column names, field schema, checks and atomic writes.

Every source (simulator, raw Ali-CCP files, CSV/Parquet) produces the same thing: a
``pyarrow.Table`` with one row per impression, ``click`` and ``conversion`` in {0, 1}, an
ordering column ``day`` where the source has one, the feature columns named by a
:class:`TableSchema`, and (simulated tables only) ground-truth columns that are never features.

Arrow types per field kind:
- ``single``: one id per impression, ``int64`` or ``string``; null = missing.
- ``multi``: several ids per impression, ``list<int64>`` or ``list<string>``; sum-pooled by the
  model (field-wise pooling). An empty list means "no value".
- ``dense``: one float per impression, ``float32``/``float64``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from esmm.atomic import atomic_path

CLICK = "click"
CONVERSION = "conversion"
DAY = "day"
LABEL_COLUMNS = (CLICK, CONVERSION)
TRUTH_COLUMNS = ("true_ctr", "true_cvr")


class DataError(ValueError):
    """Bad input data. The message names the file, the column and how many rows are affected."""


class FieldKind(StrEnum):
    SINGLE = "single"
    MULTI = "multi"
    DENSE = "dense"


@dataclass(frozen=True)
class FieldSpec:
    name: str
    kind: FieldKind
    allow_missing: bool = False

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": str(self.kind), "allow_missing": self.allow_missing}


@dataclass(frozen=True)
class TableSchema:
    """The ordered feature fields of a table. Labels, ``day`` and ground truth are not fields."""

    fields: tuple[FieldSpec, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        names = [f.name for f in self.fields]
        reserved = set(LABEL_COLUMNS) | set(TRUTH_COLUMNS) | {DAY}
        bad = sorted(set(names) & reserved)
        if bad:
            raise DataError(f"columns {bad} are labels, ordering or ground truth, never features")
        if len(set(names)) != len(names):
            dupes = sorted({n for n in names if names.count(n) > 1})
            raise DataError(f"feature fields listed twice: {dupes}")

    def names(self, kind: FieldKind | None = None) -> list[str]:
        return [f.name for f in self.fields if kind is None or f.kind == kind]

    def __getitem__(self, name: str) -> FieldSpec:
        for spec in self.fields:
            if spec.name == name:
                return spec
        raise KeyError(name)

    def to_dict(self) -> dict:
        return {"fields": [f.to_dict() for f in self.fields]}

    @classmethod
    def from_dict(cls, data: Mapping) -> TableSchema:
        return cls(
            tuple(
                FieldSpec(f["name"], FieldKind(f["kind"]), bool(f.get("allow_missing", False)))
                for f in data["fields"]
            )
        )

    @classmethod
    def of(
        cls, kinds: Mapping[str, str | FieldKind], allow_missing: Iterable[str] = ()
    ) -> TableSchema:
        """Shorthand: ``TableSchema.of({"user_id": "single", "tags": "multi"})``."""
        missing_ok = set(allow_missing)
        return cls(tuple(FieldSpec(n, FieldKind(k), n in missing_ok) for n, k in kinds.items()))


def check_table(table: pa.Table, schema: TableSchema, source: str) -> None:
    """Raise :class:`DataError` naming ``source``, the column and the count for each problem.

    Checks: the table is not empty; label and feature columns exist with usable types; labels
    are in {0, 1}; conversion implies click; features have no nulls/NaN unless the field allows
    missing values. All problems are collected and reported together.
    """
    if table.num_rows == 0:
        raise DataError(f"{source}: the table is empty (0 rows)")
    problems: list[str] = []
    missing = [c for c in (*LABEL_COLUMNS, *schema.names()) if c not in table.column_names]
    if missing:
        raise DataError(f"{source}: missing columns {missing}; present: {table.column_names}")

    for label in LABEL_COLUMNS:
        column = table[label]
        if column.null_count:
            problems.append(f"column '{label}': {column.null_count} null values")
            continue
        if not (
            pa.types.is_integer(column.type)
            or pa.types.is_floating(column.type)
            or pa.types.is_boolean(column.type)
        ):
            problems.append(f"column '{label}': type {column.type} is not numeric")
            continue
        values = column.to_numpy()
        bad = ~np.isin(values, (0, 1))
        if bad.any():
            examples = sorted({v.item() for v in values[bad][:1000]})[:5]
            problems.append(
                f"column '{label}': {int(bad.sum())} values outside {{0,1}} (e.g. {examples})"
            )
    if not problems:
        click = table[CLICK].to_numpy()
        conversion = table[CONVERSION].to_numpy()
        orphan = (conversion == 1) & (click == 0)
        if orphan.any():
            rows = np.flatnonzero(orphan)[:5].tolist()
            problems.append(
                f"columns 'conversion'/'click': {int(orphan.sum())} rows have conversion=1 with "
                f"click=0 (first rows {rows}); a conversion can only follow a click"
            )

    for spec in schema.fields:
        problems.extend(_check_feature(table[spec.name], spec))
    if problems:
        raise DataError(f"{source}: " + "; ".join(problems))


def _check_feature(column: pa.ChunkedArray, spec: FieldSpec) -> list[str]:
    kind, name = spec.kind, spec.name
    type_ok = {
        FieldKind.SINGLE: pa.types.is_integer(column.type)
        or pa.types.is_string(column.type)
        or pa.types.is_large_string(column.type),
        FieldKind.MULTI: pa.types.is_list(column.type) or pa.types.is_large_list(column.type),
        FieldKind.DENSE: pa.types.is_floating(column.type) or pa.types.is_integer(column.type),
    }[kind]
    if not type_ok:
        return [f"column '{name}': type {column.type} does not fit a {kind} field"]
    n_missing = column.null_count
    if kind == FieldKind.DENSE and pa.types.is_floating(column.type):
        n_missing += int(pc.sum(pc.is_nan(column)).as_py() or 0)
    if kind == FieldKind.MULTI:
        n_missing += pc.list_flatten(column).null_count
    if n_missing and not spec.allow_missing:
        return [f"column '{name}': {n_missing} null/NaN values in a field that allows none"]
    return []


def write_parquet_atomic(
    table: pa.Table, path: str | Path, metadata: Mapping | None = None
) -> Path:
    """Write ``table`` to ``path`` through a temporary file in the same folder, then rename,
    so a failed or killed write never leaves a half-written file under the final name."""
    if metadata:
        existing = table.schema.metadata or {}
        table = table.replace_schema_metadata(
            {**existing, b"esmm": json.dumps(dict(metadata)).encode()}
        )
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return Path(path)


def read_parquet_metadata(path: str | Path) -> dict:
    """The ``esmm`` metadata written by :func:`write_parquet_atomic` (empty if none)."""
    raw = (pq.read_schema(path).metadata or {}).get(b"esmm")
    return json.loads(raw) if raw else {}
