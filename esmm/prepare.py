"""Stage `prepare`: load the source, check it, split it by time, fit the encoders on train.

Output folder ``<output_dir>/prepared``: ``train.parquet``, ``val.parquet``, ``test.parquet``
(canonical rows), ``encoder/`` (fitted on train only) and ``manifest.json`` (row, click and
conversion counts per split, the schema, a fingerprint of the data). Written to a temporary
folder and renamed, so a failed prepare leaves the previous output untouched.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from esmm.atomic import atomic_folder
from esmm.config import Config
from esmm.data.encode import FeatureEncoder
from esmm.data.sources import load_splits
from esmm.data.split import SPLITS
from esmm.data.table import CLICK, CONVERSION, DataError

log = logging.getLogger(__name__)

PREPARED_FOLDER = "prepared"
MANIFEST_FILE = "manifest.json"


@dataclass
class PreparedData:
    tables: dict[str, pa.Table]
    encoder: FeatureEncoder
    manifest: dict


def prepared_path(config: Config) -> Path:
    return config.output_path / PREPARED_FOLDER


def split_summary(table: pa.Table) -> dict:
    clicks = int(pc.sum(table[CLICK]).as_py() or 0)
    conversions = int(pc.sum(table[CONVERSION]).as_py() or 0)
    return {
        "rows": table.num_rows,
        "clicks": clicks,
        "conversions": conversions,
        "ctr": clicks / table.num_rows if table.num_rows else float("nan"),
        "cvr_per_click": conversions / clicks if clicks else float("nan"),
    }


def table_fingerprint(tables: dict[str, pa.Table]) -> str:
    """A content hash of the split tables (their Arrow IPC bytes), for tagging runs and caching."""
    digest = hashlib.sha256()
    for name in SPLITS:
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, tables[name].schema) as writer:
            writer.write_table(tables[name])
        digest.update(name.encode())
        digest.update(sink.getvalue())
    return digest.hexdigest()[:16]


def prepare(config: Config, input_fingerprint: str | None = None) -> PreparedData:
    """``input_fingerprint`` (of the source files) is recorded in the manifest, so the
    pipeline can tell whether the prepared folder still matches its input."""
    tables, schema = load_splits(config)
    for name in SPLITS:
        if tables[name].num_rows == 0:
            raise DataError(f"the {name} split is empty after splitting")
    encoder = FeatureEncoder.fit(tables["train"], schema, config.encode.min_count)
    manifest = {
        "source": config.data.source,
        "schema": schema.to_dict(),
        "splits": {name: split_summary(tables[name]) for name in SPLITS},
        "fingerprint": table_fingerprint(tables),
        "input_fingerprint": input_fingerprint,
        "cardinalities": encoder.cardinalities,
    }
    for name in SPLITS:
        summary = manifest["splits"][name]
        if summary["clicks"] == 0:
            raise DataError(f"the {name} split has no clicks; CTR and CVR cannot be learned")
        log.info(
            "%-5s %9d rows  %7d clicks (CTR %.3f%%)  %6d conversions (%.2f%% per click)",
            name,
            summary["rows"],
            summary["clicks"],
            100 * summary["ctr"],
            summary["conversions"],
            100 * summary["cvr_per_click"],
        )

    with atomic_folder(prepared_path(config)) as staging:
        for name in SPLITS:
            pq.write_table(tables[name], staging / f"{name}.parquet")
        encoder.save(staging / "encoder")
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    return PreparedData(tables, encoder, manifest)


def load_manifest(config: Config) -> dict:
    """The prepared data's manifest (counts, schema, fingerprints), without reading tables."""
    folder = prepared_path(config)
    manifest_path = folder / MANIFEST_FILE
    if not manifest_path.exists():
        raise DataError(f"{folder}: no prepared data; run `esmm prepare` first")
    return json.loads(manifest_path.read_text())


def load_prepared_split(config: Config, split: str) -> pa.Table:
    """One prepared split (stages that score the test days need no training rows)."""
    load_manifest(config)  # the clear error when nothing is prepared
    return pq.read_table(prepared_path(config) / f"{split}.parquet")


def load_prepared(config: Config) -> PreparedData:
    manifest = load_manifest(config)
    folder = prepared_path(config)
    tables = {name: pq.read_table(folder / f"{name}.parquet") for name in SPLITS}
    encoder = FeatureEncoder.load(folder / "encoder")
    return PreparedData(tables, encoder, manifest)
