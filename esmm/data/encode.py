"""Per-field encoders and the encoded, tensor-held form of a split.

Encoders are fitted on the training split only: ids seen at least ``min_count`` times get
1..V, everything else (unseen, rare, or missing) maps to 0, the shared out-of-vocabulary id.
Dense fields are standardised with the training mean and standard deviation. The fitted
encoder is saved beside the model, so prediction takes raw feature values.

Encoded features live in contiguous tensors: single-id fields as one ``[N, F]`` int32 matrix,
each multi-id field as CSR (flat ids plus ``N+1`` offsets), dense fields as ``[N, D]`` float32.
Batches are taken by index (a slice of a per-epoch permutation) with whole-tensor operations.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from esmm.atomic import atomic_folder
from esmm.data.table import CLICK, CONVERSION, DataError, FieldKind, TableSchema

OOV_ID = 0


@dataclass
class EncodedFeatures:
    single_ids: torch.Tensor  # [N, n_single] int32, per-field ids (0 = out of vocabulary)
    multi_values: list[torch.Tensor]  # per multi field: flat int32 ids
    multi_offsets: list[torch.Tensor]  # per multi field: [N+1] int64 row starts
    dense: torch.Tensor  # [N, n_dense] float32, standardised

    def __len__(self) -> int:
        return self.single_ids.shape[0]

    def take(self, rows: torch.Tensor) -> EncodedFeatures:
        """The rows at ``rows`` (int64 index tensor), gathered without per-row Python."""
        values, offsets = [], []
        for flat, row_offsets in zip(self.multi_values, self.multi_offsets, strict=True):
            starts = row_offsets[rows]
            lengths = row_offsets[rows + 1] - starts
            batch_offsets = torch.zeros(rows.numel() + 1, dtype=torch.int64)
            torch.cumsum(lengths, 0, out=batch_offsets[1:])
            shift = torch.repeat_interleave(starts - batch_offsets[:-1], lengths)
            positions = torch.arange(int(batch_offsets[-1])) + shift
            values.append(flat[positions])
            offsets.append(batch_offsets)
        return EncodedFeatures(self.single_ids[rows], values, offsets, self.dense[rows])

    def slice(self, start: int, stop: int) -> EncodedFeatures:
        """Rows ``start:stop`` as views where possible (evaluation walks the data in order)."""
        values, offsets = [], []
        for flat, row_offsets in zip(self.multi_values, self.multi_offsets, strict=True):
            window = row_offsets[start : stop + 1]
            values.append(flat[int(window[0]) : int(window[-1])])
            offsets.append(window - window[0])
        return EncodedFeatures(self.single_ids[start:stop], values, offsets, self.dense[start:stop])


@dataclass
class EncodedSplit:
    """Features plus labels of one split; ``true_cvr`` only for simulated data."""

    features: EncodedFeatures
    click: torch.Tensor  # [N] float32
    conversion: torch.Tensor  # [N] float32
    true_cvr: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.features)

    def take(self, rows: torch.Tensor) -> EncodedSplit:
        """The rows at ``rows`` (e.g. a subsample of the training impressions)."""
        truth = None if self.true_cvr is None else self.true_cvr[rows.numpy()]
        return EncodedSplit(
            self.features.take(rows), self.click[rows], self.conversion[rows], truth
        )


class FeatureEncoder:
    """Vocabularies and dense statistics for every field of a schema, fitted on one table."""

    def __init__(
        self,
        schema: TableSchema,
        min_count: int,
        vocabularies: dict[str, pa.Array],
        dense_stats: dict[str, tuple[float, float]],
    ) -> None:
        self.schema = schema
        self.min_count = min_count
        self.vocabularies = vocabularies
        self.dense_stats = dense_stats

    @classmethod
    def fit(cls, table: pa.Table, schema: TableSchema, min_count: int = 1) -> FeatureEncoder:
        if min_count < 1:
            raise ValueError(f"encode.min_count must be >= 1, got {min_count}")
        vocabularies, dense_stats = {}, {}
        for spec in schema.fields:
            column = table[spec.name]
            if spec.kind == FieldKind.DENSE:
                values = column.to_numpy(zero_copy_only=False).astype(np.float64)
                mean, std = np.nanmean(values), np.nanstd(values)
                dense_stats[spec.name] = (float(mean), float(std) if std > 0 else 1.0)
                continue
            if spec.kind == FieldKind.MULTI:
                column = pc.list_flatten(column)
            counts = pc.value_counts(column.drop_null() if column.null_count else column)
            frequent = counts.filter(pc.greater_equal(counts.field("counts"), min_count))
            vocabulary = frequent.field("values")
            vocabularies[spec.name] = vocabulary.take(pc.sort_indices(vocabulary))
        return cls(schema, min_count, vocabularies, dense_stats)

    @property
    def cardinalities(self) -> dict[str, int]:
        """Embedding rows per id field: the vocabulary plus the out-of-vocabulary id 0."""
        return {name: len(v) + 1 for name, v in self.vocabularies.items()}

    def transform(self, table: pa.Table) -> EncodedFeatures:
        missing = [n for n in self.schema.names() if n not in table.column_names]
        if missing:
            raise DataError(f"columns {missing} required by the encoder are missing")
        single_names = self.schema.names(FieldKind.SINGLE)
        single = np.empty((table.num_rows, len(single_names)), dtype=np.int32)
        for j, name in enumerate(single_names):
            single[:, j] = self._ids(name, table[name])
        multi_values, multi_offsets = [], []
        for name in self.schema.names(FieldKind.MULTI):
            lists = table[name].combine_chunks()
            if lists.null_count:  # a null list is an empty bag
                lists = pc.fill_null(lists, pa.scalar([], type=lists.type))
            offsets = lists.offsets.to_numpy().astype(np.int64)
            flat = lists.values.slice(offsets[0], offsets[-1] - offsets[0])
            multi_values.append(torch.from_numpy(self._ids(name, flat)))
            multi_offsets.append(torch.from_numpy(offsets - offsets[0]))
        dense_names = self.schema.names(FieldKind.DENSE)
        dense = np.zeros((table.num_rows, len(dense_names)), dtype=np.float32)
        for j, name in enumerate(dense_names):
            mean, std = self.dense_stats[name]
            values = table[name].to_numpy(zero_copy_only=False).astype(np.float64)
            dense[:, j] = np.nan_to_num((values - mean) / std, nan=0.0)
        return EncodedFeatures(
            torch.from_numpy(single), multi_values, multi_offsets, torch.from_numpy(dense)
        )

    def _ids(self, name: str, values: pa.Array | pa.ChunkedArray) -> np.ndarray:
        vocabulary = self.vocabularies[name]
        if not values.type.equals(vocabulary.type) and len(vocabulary):
            try:
                values = values.cast(vocabulary.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:
                raise DataError(
                    f"column '{name}': type {values.type} cannot be matched to the encoder's "
                    f"{vocabulary.type} vocabulary ({error})"
                ) from error
        positions = pc.index_in(values, value_set=vocabulary)
        ids = pc.fill_null(pc.add(positions, 1), OOV_ID)
        return ids.to_numpy(zero_copy_only=False).astype(np.int32)

    def encode_split(self, table: pa.Table, with_truth: bool = True) -> EncodedSplit:
        truth = None
        if with_truth and "true_cvr" in table.column_names:
            truth = table["true_cvr"].to_numpy()
        return EncodedSplit(
            self.transform(table),
            torch.from_numpy(table[CLICK].to_numpy().astype(np.float32)),
            torch.from_numpy(table[CONVERSION].to_numpy().astype(np.float32)),
            truth,
        )

    def save(self, folder: str | Path) -> Path:
        """Write the encoder to ``folder`` (JSON header + one Parquet vocabulary per field),
        through a temporary folder renamed into place."""
        with atomic_folder(folder) as staging:
            header = {
                "schema": self.schema.to_dict(),
                "min_count": self.min_count,
                "dense_stats": self.dense_stats,
                "cardinalities": self.cardinalities,
            }
            (staging / "encoder.json").write_text(json.dumps(header, indent=2))
            for name, vocabulary in self.vocabularies.items():
                pq.write_table(pa.table({"value": vocabulary}), staging / f"vocab.{name}.parquet")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> FeatureEncoder:
        folder = Path(folder)
        header_path = folder / "encoder.json"
        if not header_path.exists():
            raise FileNotFoundError(f"no encoder at {folder} (missing {header_path.name})")
        header = json.loads(header_path.read_text())
        schema = TableSchema.from_dict(header["schema"])
        vocabularies = {
            name: pq.read_table(folder / f"vocab.{name}.parquet")["value"].combine_chunks()
            for name in schema.names()
            if schema[name].kind != FieldKind.DENSE
        }
        dense_stats = {k: (float(v[0]), float(v[1])) for k, v in header["dense_stats"].items()}
        return cls(schema, int(header["min_count"]), vocabularies, dense_stats)
