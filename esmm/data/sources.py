"""Load the train/val/test tables of a configuration from its data source.

Every source ends in the canonical impression table (esmm/data/table.py), split by time: by
the ``day`` column for one table, or by file when the source gives one file per split.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from esmm.config import Config
from esmm.data.split import SPLITS, hold_out_tail, split_by_day
from esmm.data.table import DataError, TableSchema, check_table

log = logging.getLogger(__name__)


def simulated_table_path(config: Config) -> Path:
    """Where ``esmm simulate`` writes, and ``esmm prepare`` reads, the simulated table."""
    return (
        Path(config.data.path) if config.data.path else config.output_path / "impressions.parquet"
    )


def load_splits(config: Config) -> tuple[dict[str, pa.Table], TableSchema]:
    """The checked train/val/test tables and the feature schema of ``config``'s data source."""
    data = config.data
    if data.source == "simulator":
        from esmm.data.simulate import simulator_schema

        path = simulated_table_path(config)
        if not path.exists():
            raise DataError(f"{path}: simulated table not found; run `esmm simulate` first")
        table = pq.read_table(path)
        check_table(table, simulator_schema(), str(path))
        splits = split_by_day(table, config.split.test_fraction, config.split.val_days, str(path))
        return splits, simulator_schema()

    if data.source == "table" and data.path:
        from esmm.data.tabular import read_table_file

        table, schema = read_table_file(
            data.path, columns=data.columns, fields=data.fields, allow_missing=data.allow_missing
        )
        check_table(table, schema, data.path)
        return split_by_day(table, config.split.test_fraction, config.split.val_days, data.path), (
            schema
        )

    assert data.files is not None  # guaranteed by DataSettings' validator
    tables: dict[str, pa.Table] = {}
    schema: TableSchema | None = None
    for split, paths in data.files.items():
        # Splits are consecutive periods of time: train (day 0), val (1), test (2).
        table, schema = _read_split_files(config, paths, SPLITS.index(split))
        tables[split] = table
    if "test" not in tables:
        raise DataError(f"data.files has no 'test' entry (got {sorted(tables)})")
    if "val" not in tables:
        tables["train"], tables["val"] = hold_out_tail(tables["train"], config.split.val_fraction)
    assert schema is not None
    for split, table in tables.items():
        check_table(table, schema, f"{split} split ({', '.join(data.files.get(split, ['train']))})")
    return tables, schema


def _read_split_files(config: Config, paths: list[str], day: int) -> tuple[pa.Table, TableSchema]:
    data = config.data
    if data.source == "aliccp_raw":
        from esmm.data.aliccp import aliccp_schema, read_aliccp_raw

        if len(paths) != 2:
            raise DataError(
                f"data.files for aliccp_raw takes [skeleton, common_features], got {paths}"
            )
        table, report = read_aliccp_raw(
            paths[0], paths[1], day=day, conversion_without_click=data.conversion_without_click
        )
        log.info("%s", report.summary())
        return table, aliccp_schema()
    if data.source == "paddlerec":
        from esmm.data.aliccp import aliccp_schema, read_paddlerec

        parts = []
        for path in paths:
            table, report = read_paddlerec(path, day=day)
            log.info("%s", report.summary())
            parts.append(table)
        return pa.concat_tables(parts), aliccp_schema()

    from esmm.data.tabular import read_table_file

    parts, schema = [], None
    for path in paths:
        table, schema = read_table_file(
            path, columns=data.columns, fields=data.fields, allow_missing=data.allow_missing
        )
        if "day" not in table.column_names:
            days = np.full(table.num_rows, day, dtype=np.int32)
            table = table.append_column("day", pa.array(days))
        parts.append(table)
    assert schema is not None
    return pa.concat_tables(parts, promote_options="permissive"), schema
