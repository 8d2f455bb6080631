"""Load the train/val/test tables of a configuration from its data source.

Every source ends in the canonical impression table (esmm/data/table.py), split by time: by
the ``day`` column for one table, or by file when the source gives one file per split.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from esmm.config import Config
from esmm.data.split import SPLITS, hold_out_tail, split_by_day
from esmm.data.table import (
    DAY,
    DataError,
    TableSchema,
    check_table,
    read_parquet_metadata,
    write_parquet_atomic,
)

log = logging.getLogger(__name__)

WHOLE_FILE_HASH_LIMIT = 256 << 20


def simulated_table_path(config: Config) -> Path:
    """Where ``esmm simulate`` writes, and ``esmm prepare`` reads, the simulated table."""
    return (
        Path(config.data.path) if config.data.path else config.output_path / "impressions.parquet"
    )


def simulate_to_file(config: Config, progress: bool = False) -> tuple[Path, pa.Table]:
    """Write the configured simulated table to its path (atomically); returns both."""
    from esmm.data.simulate import simulate_impressions

    settings = config.data.simulator
    table = simulate_impressions(
        settings.rows,
        preset=settings.preset,
        n_days=settings.days,
        seed=settings.seed,
        progress=progress,
    )
    path = write_parquet_atomic(table, simulated_table_path(config), settings.model_dump())
    return path, table


def append_simulated_day(config: Config) -> tuple[Path, int, int]:
    """Append the next day (``rows / days`` impressions of the same simulated world) to the
    simulated table, as a daily partition arriving would; returns (path, day, rows added)."""
    from esmm.data.simulate import simulate_day

    path = simulated_table_path(config)
    if not path.exists():
        raise DataError(f"{path}: no simulated table to append to; run `esmm simulate` first")
    settings = config.data.simulator
    existing = pq.read_table(path)
    day = int(pc.max(existing[DAY]).as_py()) + 1
    rows = max(1, settings.rows // settings.days)
    added = simulate_day(day, rows, preset=settings.preset, seed=settings.seed)
    metadata = read_parquet_metadata(path) | {"last_day": day}
    write_parquet_atomic(pa.concat_tables([existing, added]), path, metadata)
    return path, day, rows


def source_files(config: Config) -> list[Path]:
    """The files the configured source reads."""
    data = config.data
    if data.source == "simulator":
        return [simulated_table_path(config)]
    if data.path:
        return [Path(data.path)]
    return [Path(path) for paths in (data.files or {}).values() for path in paths]


def source_fingerprint(config: Config) -> str:
    """A content hash of the source files plus the settings that shape what is read: it keys
    the pipeline's cache of prepared data. Files up to 256 MiB are hashed whole; larger ones
    by size, modification time and their first and last MiB (hashing 20 GB each run would
    cost more than preparing)."""
    digest = hashlib.sha256()
    digest.update(config.data.model_dump_json().encode())
    for path in source_files(config):
        if not path.exists():
            raise DataError(f"{path}: data file not found")
        stat = path.stat()
        digest.update(f"{path.resolve()}|{stat.st_size}".encode())
        with open(path, "rb") as handle:
            if stat.st_size <= WHOLE_FILE_HASH_LIMIT:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
            else:
                digest.update(f"{stat.st_mtime_ns}".encode())
                digest.update(handle.read(1 << 20))
                handle.seek(-(1 << 20), 2)
                digest.update(handle.read(1 << 20))
    return digest.hexdigest()[:16]


def read_source(config: Config) -> tuple[dict[str, pa.Table], TableSchema, dict[str, str]]:
    """The source's impressions as read, before any check: ``{"all": table}`` for one table
    split later by ``day``, or one table per split for file-per-split sources; the schema; and
    a label per table (the files it came from) for error messages. The day window
    (``data.window_days``) is applied to single tables."""
    data = config.data
    if data.source == "simulator":
        from esmm.data.simulate import simulator_schema

        path = simulated_table_path(config)
        if not path.exists():
            raise DataError(f"{path}: simulated table not found; run `esmm simulate` first")
        table = latest_days(pq.read_table(path), data.window_days, str(path))
        return {"all": table}, simulator_schema(), {"all": str(path)}

    if data.source == "table" and data.path:
        from esmm.data.tabular import read_table_file

        table, schema = read_table_file(
            data.path, columns=data.columns, fields=data.fields, allow_missing=data.allow_missing
        )
        return {"all": latest_days(table, data.window_days, data.path)}, schema, {"all": data.path}

    assert data.files is not None  # guaranteed by DataSettings' validator
    tables: dict[str, pa.Table] = {}
    schema: TableSchema | None = None
    for split, paths in data.files.items():
        # Splits are consecutive periods of time: train (day 0), val (1), test (2).
        tables[split], schema = _read_split_files(config, paths, SPLITS.index(split))
    assert schema is not None
    return tables, schema, {split: ", ".join(paths) for split, paths in data.files.items()}


def load_unchecked(config: Config) -> tuple[pa.Table, TableSchema, str]:
    """All impressions of the source as one table, unchecked: what `esmm validate` inspects."""
    tables, schema, labels = read_source(config)
    table = pa.concat_tables(tables.values(), promote_options="permissive")
    return table, schema, "; ".join(labels.values())


def load_splits(config: Config) -> tuple[dict[str, pa.Table], TableSchema]:
    """The checked train/val/test tables and the feature schema of ``config``'s data source."""
    tables, schema, labels = read_source(config)
    if "all" in tables:
        table, label = tables["all"], labels["all"]
        check_table(table, schema, label)
        return split_by_day(table, config.split.test_fraction, config.split.val_days, label), (
            schema
        )
    if "test" not in tables:
        raise DataError(f"data.files has no 'test' entry (got {sorted(tables)})")
    if "val" not in tables:
        tables["train"], tables["val"] = hold_out_tail(tables["train"], config.split.val_fraction)
        labels["val"] = f"last {config.split.val_fraction:.0%} of {labels['train']}"
    for split, table in tables.items():
        check_table(table, schema, f"{split} split ({labels[split]})")
    return tables, schema


def latest_days(table: pa.Table, window_days: int | None, source: str) -> pa.Table:
    """The rows of the most recent ``window_days`` distinct days (all rows when None): a
    scheduled run trains on a sliding window of daily partitions."""
    if window_days is None:
        return table
    if DAY not in table.column_names:
        raise DataError(f"{source}: data.window_days needs a '{DAY}' column")
    days = np.unique(table[DAY].to_numpy())
    keep = days[-window_days:]
    log.info("window: the latest %d of %d days (%s..%s)", keep.size, days.size, keep[0], keep[-1])
    return table.filter(pc.is_in(table[DAY], value_set=pa.array(keep)))


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
