"""Time splits: train on the past, validate on the next days, test on the future.

The paper splits Ali-CCP by time into halves; the default here is the same (the last half of
the days is test), with the last ``val_days`` days before the test period used for validation
(early stopping and, later, tuning) so the test days are never looked at during training.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from esmm.data.table import DAY, DataError

SPLITS = ("train", "val", "test")


def split_by_day(
    table: pa.Table, test_fraction: float, val_days: int, source: str = "table"
) -> dict[str, pa.Table]:
    """Split on the ``day`` column: the last ``round(test_fraction * n_days)`` days are test,
    the ``val_days`` days before them validation, the earlier days training."""
    if DAY not in table.column_names:
        raise DataError(f"{source}: no '{DAY}' column to split by time")
    days = np.unique(table[DAY].to_numpy())
    n_test = max(1, round(test_fraction * days.size))
    n_train = days.size - n_test - val_days
    if n_train < 1:
        raise DataError(
            f"{source}: column '{DAY}' has {days.size} distinct days {days.tolist()[:10]}; "
            f"a split into {n_test} test, {val_days} validation and at least 1 training day "
            f"needs {n_test + val_days + 1}"
        )
    groups = {
        "train": days[:n_train],
        "val": days[n_train : n_train + val_days],
        "test": days[n_train + val_days :],
    }
    return {
        name: table.filter(pc.is_in(table[DAY], value_set=pa.array(group)))
        for name, group in groups.items()
    }


def hold_out_tail(table: pa.Table, fraction: float) -> tuple[pa.Table, pa.Table]:
    """Keep the last ``fraction`` of rows (the latest, in file order) for validation."""
    n_val = max(1, round(table.num_rows * fraction))
    if n_val >= table.num_rows:
        raise DataError(f"cannot hold out {n_val} validation rows from {table.num_rows}")
    cut = table.num_rows - n_val
    return table.slice(0, cut), table.slice(cut)
