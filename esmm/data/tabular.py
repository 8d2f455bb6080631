"""CSV and Parquet files that already hold one impression per row.

A column mapping renames file columns to the canonical names (``conversion: purchase`` reads
the file's ``purchase`` column as ``conversion``), and the field mapping gives each feature
column its kind; glob patterns (``"numerical_*": dense``) save listing dozens of columns.
Multi-id fields in CSV are strings of ids separated by ``|``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from esmm.data.table import (
    CONVERSION,
    DAY,
    LABEL_COLUMNS,
    DataError,
    FieldKind,
    FieldSpec,
    TableSchema,
)

MULTI_SEPARATOR = "|"


def resolve_schema(
    column_names: list[str],
    fields: Mapping[str, str],
    allow_missing: list[str] | tuple[str, ...] = (),
    source: str = "",
) -> TableSchema:
    """Expand ``fields`` (names or glob patterns -> kind) over the file's columns, keeping the
    file's column order. A pattern that matches no column is an error: it is a typo."""
    kinds: dict[str, FieldKind] = {}
    for pattern, kind in fields.items():
        matched = [c for c in column_names if fnmatch.fnmatchcase(c, pattern)]
        if not matched:
            raise DataError(
                f"{source}: field '{pattern}' matches no column; columns are {column_names}"
            )
        for name in matched:
            kinds.setdefault(name, FieldKind(kind))
    missing_ok = {c for p in allow_missing for c in column_names if fnmatch.fnmatchcase(c, p)}
    ordered = [c for c in column_names if c in kinds]
    return TableSchema(tuple(FieldSpec(c, kinds[c], c in missing_ok) for c in ordered))


def read_table_file(
    path: str | Path,
    *,
    columns: Mapping[str, str] | None = None,
    fields: Mapping[str, str],
    allow_missing: list[str] | tuple[str, ...] = (),
) -> tuple[pa.Table, TableSchema]:
    """Read a CSV or Parquet impression file into the canonical table and its schema.

    ``columns`` maps canonical name -> file column (``{"conversion": "purchase"}``).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty")
    try:
        table = pq.read_table(path) if path.suffix == ".parquet" else pacsv.read_csv(path)
    except (pa.ArrowInvalid, OSError) as error:
        raise DataError(f"{path}: cannot be read as {path.suffix or 'CSV'}: {error}") from error

    renames = {file_column: canonical for canonical, file_column in (columns or {}).items()}
    absent = [c for c in renames if c not in table.column_names]
    if absent:
        raise DataError(
            f"{path}: mapped columns {absent} not found; columns are {table.column_names}"
        )
    table = table.rename_columns([renames.get(c, c) for c in table.column_names])
    missing_labels = [c for c in LABEL_COLUMNS if c not in table.column_names]
    if missing_labels:
        hint = (
            " (map it with data.columns, e.g. conversion: purchase)"
            if CONVERSION in (missing_labels)
            else ""
        )
        raise DataError(f"{path}: missing label columns {missing_labels}{hint}")

    reserved = {*LABEL_COLUMNS, DAY}
    candidates = [c for c in table.column_names if c not in reserved]
    schema = resolve_schema(candidates, fields, allow_missing, str(path))
    for spec in schema.fields:
        column = table[spec.name]
        if spec.kind == FieldKind.MULTI and pa.types.is_string(column.type):
            lists = pc.split_pattern(column, MULTI_SEPARATOR)
            table = table.set_column(table.column_names.index(spec.name), spec.name, lists)
    return table, schema
