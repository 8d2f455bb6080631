"""The validate stage: a Great Expectations suite run on the impression table before training.

The suite comes from the feature schema (required columns, types, labels in {0,1}, conversion
implies click, non-negative ids, nulls only where ``data.allow_missing`` allows them) and from
the ``validation`` section of the config (row count, click rate, conversions per click, days).
Multi-valued fields are checked through helper columns derived with pyarrow/numpy (ids per row,
smallest id per row), so no check loops over rows in Python.

Great Expectations costs about 5 s to import, so it is imported here only, inside functions.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from esmm.atomic import atomic_folder
from esmm.config import Config, ValidateSettings
from esmm.data.sources import load_unchecked
from esmm.data.split import SPLITS
from esmm.data.table import CLICK, CONVERSION, DAY, LABEL_COLUMNS, DataError, FieldKind, TableSchema

if TYPE_CHECKING:
    from rich.table import Table

log = logging.getLogger(__name__)

REPORT_FOLDER = "validation"
DATA_DOCS_FOLDER = "data_docs"
CONVERSION_PER_CLICK = "conversion_per_click"  # conversion on clicked rows, null elsewhere
LENGTH_SUFFIX = ".length"  # multi field: ids per row, null where a value is missing
MIN_ID_SUFFIX = ".min_id"  # multi field: smallest id per row
SUITE_NAME = "esmm_impressions"

# pandas dtype names as ExpectColumnValuesToBeInTypeList reads them: NumPy integers, or pandas'
# nullable integers for a column with nulls (NumPy would turn it into floats).
NULLABLE_INTEGERS = {
    pa.int8(): pd.Int8Dtype(),
    pa.int16(): pd.Int16Dtype(),
    pa.int32(): pd.Int32Dtype(),
    pa.int64(): pd.Int64Dtype(),
    pa.uint8(): pd.UInt8Dtype(),
    pa.uint16(): pd.UInt16Dtype(),
    pa.uint32(): pd.UInt32Dtype(),
    pa.uint64(): pd.UInt64Dtype(),
}
INTEGER_TYPES = [
    *(str(t) for t in NULLABLE_INTEGERS),
    *(type(dtype).__name__ for dtype in NULLABLE_INTEGERS.values()),
]
FLOAT_TYPES = ["float16", "float32", "float64"]
TYPES_BY_KIND = {
    FieldKind.SINGLE: [*INTEGER_TYPES, "StringDtype"],
    FieldKind.DENSE: [*FLOAT_TYPES, *INTEGER_TYPES],
}
LABEL_TYPES = [*INTEGER_TYPES, *FLOAT_TYPES, "bool", "BooleanDtype"]


class DataValidationFailed(DataError):
    """The data failed the suite; ``report`` holds every result (already written if staged)."""

    def __init__(self, report: ValidationReport) -> None:
        self.report = report
        failed = report.failed()
        lines = [
            f"{report.source}: {len(failed)} of {len(report.results)} expectations failed "
            f"on {report.rows:,} rows:",
            *(f"  - {outcome.describe()}" for outcome in failed),
        ]
        if report.folder is not None:
            lines.append(f"report: {report.folder}")
        super().__init__("\n".join(lines))


@dataclass(frozen=True)
class ExpectationOutcome:
    """One expectation's result, flattened from the Great Expectations JSON."""

    expectation: str
    columns: tuple[str, ...]
    success: bool
    unexpected_count: int | None = None
    element_count: int | None = None
    observed_value: Any = None
    examples: list = field(default_factory=list)  # a few unexpected values
    missing: list = field(default_factory=list)  # expected set members never seen
    expected: dict = field(default_factory=dict)  # the expectation's bounds
    error: str | None = None  # why it could not be evaluated

    @property
    def status(self) -> str:
        if self.error:
            return "not evaluated"
        return "pass" if self.success else "FAIL"

    @property
    def counts_rows(self) -> bool:
        return self.unexpected_count is not None and self.element_count is not None

    def describe(self) -> str:
        """One line: expectation(columns), then counts, observed value or why not evaluated."""
        head = f"{self.expectation}({', '.join(self.columns)})"
        if self.error:
            return f"{head}: not evaluated: {self.error}"
        if self.expectation == "expect_column_to_exist" and not self.success:
            return f"{head}: column not in the table"
        if self.counts_rows:
            text = f"{head}: {self.unexpected_count:,} of {self.element_count:,} rows unexpected"
            return f"{text} (e.g. {self.examples})" if self.examples else text
        parts = []
        if self.observed_value is not None:
            parts.append(f"observed {_short(self.observed_value)}")
        if self.examples:
            parts.append(f"unexpected {self.examples}")
        if self.missing:
            parts.append(f"missing {self.missing}")
        if self.expected:
            parts.append(
                "expected " + ", ".join(f"{k}={_short(v)}" for k, v in self.expected.items())
            )
        return f"{head}: " + ("; ".join(parts) or "failed")


@dataclass
class ValidationReport:
    """The suite's verdict on one table: per-expectation outcomes plus the raw GX result."""

    success: bool
    source: str
    rows: int
    results: list[ExpectationOutcome]
    gx_result: dict = field(repr=False)  # Great Expectations' own result JSON
    seconds: float = 0.0
    data_docs: Path | None = None  # index.html of the Data Docs site, when built
    folder: Path | None = None  # where the report was written

    def failed(self) -> list[ExpectationOutcome]:
        return [outcome for outcome in self.results if not outcome.success]

    def to_dict(self) -> dict:
        return {
            "success": self.success,
            "source": self.source,
            "rows": self.rows,
            "seconds": round(self.seconds, 3),
            "evaluated": len(self.results),
            "failed": [outcome.describe() for outcome in self.failed()],
            "data_docs": str(self.data_docs) if self.data_docs else None,
            "results": [asdict(outcome) for outcome in self.results],
        }

    def summary_markdown(self) -> str:
        failed = len(self.failed())
        verdict = "PASSED" if self.success else f"FAILED ({failed} of {len(self.results)})"
        lines = [
            f"# Data validation: {verdict}",
            "",
            f"- source: {self.source}",
            f"- rows: {self.rows:,}",
            f"- expectations: {len(self.results)}, failed: {failed}",
            f"- Data Docs: {self.data_docs or 'not built (validation.data_docs is false)'}",
        ]
        if self.data_docs:
            lines.append("  (built offline; the pages load their styles from public CDNs)")
        lines += [
            "",
            "| status | expectation | column(s) | unexpected / rows | observed |",
            "| --- | --- | --- | --- | --- |",
        ]
        for outcome in self.results:
            cells = [outcome.status, outcome.expectation, ", ".join(outcome.columns)]
            cells += _counts_and_observed(outcome)
            lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
        return "\n".join(lines) + "\n"


def validate_table(
    table: pa.Table,
    schema: TableSchema,
    settings: ValidateSettings,
    source_label: str,
    data_docs_folder: Path | None = None,
) -> ValidationReport:
    """Run the suite on ``table``; write nothing unless ``data_docs_folder`` asks for the
    Data Docs HTML site. A missing or mistyped column fails its own expectation and leaves the
    others on it failed or not evaluated, never a traceback."""
    _great_expectations()  # imported before the clock starts: ~5 s once per process
    started = time.perf_counter()
    frame = _frame_to_check(table, schema)
    context, suite, definition = _gx_objects(_suite_expectations(table, schema, settings))
    gx_result = definition.run(batch_parameters={"dataframe": frame}, result_format="SUMMARY")
    data_docs = None if data_docs_folder is None else _build_data_docs(context, data_docs_folder)
    result = gx_result.to_json_dict()
    order = {expectation.id: i for i, expectation in enumerate(suite.expectations)}
    ordered = sorted(result["results"], key=lambda r: order[r["expectation_config"]["id"]])
    outcomes = [_outcome(r, set(frame.columns)) for r in ordered]
    report = ValidationReport(
        success=all(outcome.success for outcome in outcomes),
        source=source_label,
        rows=table.num_rows,
        results=outcomes,
        gx_result=result,
        seconds=time.perf_counter() - started,
        data_docs=data_docs,
    )
    log.info(
        "validated %d rows against %d expectations in %.1f s: %s",
        report.rows,
        len(outcomes),
        report.seconds,
        "passed" if report.success else f"{len(report.failed())} failed",
    )
    return report


def validate_stage(config: Config) -> ValidationReport:
    """Load the source unchecked, validate it, write ``<output_dir>/validation/`` (report.json,
    summary.md, data_docs/) atomically, then raise :class:`DataValidationFailed` on failure, so
    a failed run still leaves its report."""
    table, schema, source = load_unchecked(config)
    settings = config.validation
    if settings.days is None and config.data.files:
        # A file per split is numbered by split (train 0, val 1, test 2), not by calendar
        # day: expect those numbers rather than a gap-free range.
        days = sorted(SPLITS.index(split) for split in config.data.files)
        settings = settings.model_copy(update={"days": days})
    schema = TableSchema(
        tuple(
            replace(
                spec, allow_missing=spec.allow_missing or spec.name in config.data.allow_missing
            )
            for spec in schema.fields
        )
    )
    folder = config.output_path / REPORT_FOLDER
    with atomic_folder(folder) as staging:
        docs = staging / DATA_DOCS_FOLDER if settings.data_docs else None
        report = validate_table(table, schema, settings, source, data_docs_folder=docs)
        report.folder = folder
        if report.data_docs is not None:  # where the site lands once the folder is renamed
            report.data_docs = folder / report.data_docs.relative_to(staging.resolve())
        payload = {"summary": report.to_dict(), "great_expectations": report.gx_result}
        (staging / "report.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
        (staging / "summary.md").write_text(report.summary_markdown())
    if not report.success:
        raise DataValidationFailed(report)
    return report


def summary_table(report: ValidationReport) -> Table:
    """The report as a rich table for the terminal (failures in red)."""
    from rich.table import Table

    verdict = "passed" if report.success else f"FAILED: {len(report.failed())} expectations"
    table = Table(title=f"Data validation {verdict} ({report.rows:,} rows)")
    for name in ("status", "expectation", "column(s)", "unexpected / rows", "observed"):
        table.add_column(name)
    for outcome in report.results:
        style = None if outcome.success else "red"
        cells = [outcome.status, outcome.expectation, ", ".join(outcome.columns)]
        table.add_row(*cells, *_counts_and_observed(outcome), style=style)
    return table


def _suite_expectations(table: pa.Table, schema: TableSchema, settings: ValidateSettings) -> list:
    """The expectations for this schema and these bounds. Checks that only make sense for one
    Arrow type (non-negative integer ids, the day range) look at the column's type."""
    gxe = _great_expectations().expectations
    types = {name: table.schema.field(name).type for name in table.column_names}
    expectations: list = [
        gxe.ExpectColumnToExist(column=name) for name in (*LABEL_COLUMNS, DAY, *schema.names())
    ]
    for label in LABEL_COLUMNS:
        expectations += [
            gxe.ExpectColumnValuesToBeInTypeList(column=label, type_list=LABEL_TYPES),
            gxe.ExpectColumnValuesToNotBeNull(column=label),
            gxe.ExpectColumnValuesToBeInSet(column=label, value_set=[0, 1]),
        ]
    expectations += [
        gxe.ExpectColumnPairValuesAToBeGreaterThanB(
            column_A=CLICK, column_B=CONVERSION, or_equal=True
        ),
        gxe.ExpectTableRowCountToBeBetween(min_value=settings.min_rows),
        gxe.ExpectColumnMeanToBeBetween(
            column=CLICK, min_value=settings.ctr_range[0], max_value=settings.ctr_range[1]
        ),
        gxe.ExpectColumnMeanToBeBetween(
            column=CONVERSION_PER_CLICK,
            min_value=settings.cvr_per_click_range[0],
            max_value=settings.cvr_per_click_range[1],
        ),
    ]
    expectations += _day_expectations(table, types.get(DAY), settings)
    for spec in schema.fields:
        name, kind = spec.name, spec.kind
        if kind == FieldKind.MULTI:
            expectations.append(gxe.ExpectColumnValuesToBeOfType(column=name, type_="list"))
            if not spec.allow_missing:
                expectations.append(gxe.ExpectColumnValuesToNotBeNull(column=name + LENGTH_SUFFIX))
            if _is_integer_list(types.get(name)):
                expectations.append(
                    gxe.ExpectColumnValuesToBeBetween(column=name + MIN_ID_SUFFIX, min_value=0)
                )
            continue
        expectations.append(
            gxe.ExpectColumnValuesToBeInTypeList(column=name, type_list=TYPES_BY_KIND[kind])
        )
        if not spec.allow_missing:
            expectations.append(gxe.ExpectColumnValuesToNotBeNull(column=name))
        if kind == FieldKind.SINGLE and _is_integer(types.get(name)):
            expectations.append(gxe.ExpectColumnValuesToBeBetween(column=name, min_value=0))
    return expectations


def _day_expectations(
    table: pa.Table, day_type: pa.DataType | None, settings: ValidateSettings
) -> list:
    """Daily partitions: the configured days exactly, or else enough non-negative days with
    none missing between the first and the last."""
    gxe = _great_expectations().expectations
    expectations: list = [
        gxe.ExpectColumnValuesToBeInTypeList(column=DAY, type_list=INTEGER_TYPES),
        gxe.ExpectColumnValuesToNotBeNull(column=DAY),
    ]
    if settings.days is not None:
        expectations.append(
            gxe.ExpectColumnDistinctValuesToEqualSet(column=DAY, value_set=settings.days)
        )
        return expectations
    expectations += [
        gxe.ExpectColumnValuesToBeBetween(column=DAY, min_value=0),
        gxe.ExpectColumnUniqueValueCountToBeBetween(column=DAY, min_value=settings.min_days),
    ]
    if _is_integer(day_type):
        first, last = pc.min_max(table[DAY]).values()
        if first.is_valid:
            every_day = list(range(first.as_py(), last.as_py() + 1))
            expectations.append(
                gxe.ExpectColumnDistinctValuesToContainSet(column=DAY, value_set=every_day)
            )
    return expectations


def _frame_to_check(table: pa.Table, schema: TableSchema) -> pd.DataFrame:
    """The columns the suite reads, as pandas (nullable integers and strings, lists kept in
    Arrow), plus the derived helper columns."""
    wanted = [c for c in (*LABEL_COLUMNS, DAY, *schema.names()) if c in table.column_names]
    columns = {name: _pandas_column(table[name]) for name in wanted}
    if all(c in wanted and _is_numeric(table.schema.field(c).type) for c in LABEL_COLUMNS):
        columns[CONVERSION_PER_CLICK] = _conversion_per_click(table)
    for spec in schema.fields:
        if spec.kind != FieldKind.MULTI or spec.name not in wanted:
            continue
        column = table[spec.name]
        if not _is_list(column.type):
            continue
        values = column.combine_chunks()
        if not spec.allow_missing:
            columns[spec.name + LENGTH_SUFFIX] = _ids_per_row(values)
        if _is_integer_list(column.type):
            columns[spec.name + MIN_ID_SUFFIX] = _smallest_id_per_row(values)
    return pd.DataFrame(columns, copy=False)


def _conversion_per_click(table: pa.Table) -> np.ndarray:
    """Conversion on clicked rows and NaN elsewhere: its mean is conversions per click."""
    click = pc.cast(table[CLICK], pa.float64()).to_numpy()
    conversion = pc.cast(table[CONVERSION], pa.float64()).to_numpy()
    return np.where(click == 1, conversion, np.nan)


def _ids_per_row(values: pa.Array) -> pd.arrays.IntegerArray:
    """Number of ids per row; null where the row or one of its ids is null (a missing value)."""
    n = len(values)
    lengths = pc.list_value_length(values)
    counts = lengths.fill_null(0).to_numpy().astype(np.int64)
    rows = np.repeat(np.arange(n), counts)  # the row of each flattened id (null rows emit none)
    null_ids = pc.is_null(pc.list_flatten(values)).to_numpy(zero_copy_only=False)
    has_null_id = np.bincount(rows[null_ids], minlength=n) > 0
    missing = pc.is_null(lengths).to_numpy(zero_copy_only=False) | has_null_id
    return pd.arrays.IntegerArray(counts, missing)


def _smallest_id_per_row(values: pa.Array) -> np.ndarray:
    """The smallest id of each row, NaN for empty rows: floats, so GX's range check runs
    vectorised (the sign survives any rounding of huge ids)."""
    lengths = pc.list_value_length(values).fill_null(0).to_numpy()
    ids = pc.cast(pc.list_flatten(values), pa.float64()).fill_null(np.inf).to_numpy()
    smallest = np.full(len(values), np.nan)
    filled = lengths > 0
    starts = np.cumsum(lengths) - lengths
    if filled.any():
        smallest[filled] = np.minimum.reduceat(ids, starts[filled])
    smallest[np.isinf(smallest)] = np.nan  # rows whose ids are all null
    return smallest


def _great_expectations() -> ModuleType:
    """Import GX quietly: analytics off, and its INFO chatter (at import and per run) kept out
    of our log."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    import great_expectations

    return great_expectations


def _gx_objects(expectations: list) -> tuple[Any, Any, Any]:
    """An in-memory GX context (no files, no docs site until asked, no progress bars)
    holding the suite and a validation definition over a whole-dataframe batch."""
    gx = _great_expectations()
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        progress_bars=ProgressBarsConfig(globally=False),
    )
    context = gx.get_context(project_config=config, mode="ephemeral")
    asset = context.data_sources.add_pandas("esmm").add_dataframe_asset("impressions")
    batch = asset.add_batch_definition_whole_dataframe("whole_table")
    suite = context.suites.add(gx.ExpectationSuite(name=SUITE_NAME, expectations=expectations))
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name=f"{SUITE_NAME}_validation", data=batch, suite=suite)
    )
    return context, suite, definition


def _build_data_docs(context: Any, folder: Path) -> Path:
    """Render the suite and the stored result as a static HTML site in ``folder``."""
    folder = Path(folder).resolve()  # GX's file store refuses relative base directories
    context.add_data_docs_site(
        "esmm",
        {
            "class_name": "SiteBuilder",
            "store_backend": {
                "class_name": "TupleFilesystemStoreBackend",
                "base_directory": str(folder),
            },
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        },
    )
    context.build_data_docs(site_names=["esmm"])
    return folder / "index.html"


def _outcome(result: dict, frame_columns: set[str]) -> ExpectationOutcome:
    config, details = result["expectation_config"], result["result"]
    kwargs = config["kwargs"]
    columns = tuple(kwargs[key] for key in ("column", "column_A", "column_B") if key in kwargs)
    expected = {
        key: value
        for key, value in kwargs.items()
        if key not in ("column", "column_A", "column_B", "batch_id") and value is not None
    }
    error = _exception_message(result.get("exception_info") or {})
    absent = [column for column in columns if column not in frame_columns]
    if error and absent:  # GX's own message for a missing column is not always clear
        error = _why_absent(absent[0])
    return ExpectationOutcome(
        expectation=config["type"],
        columns=columns,
        success=bool(result["success"]) and error is None,
        unexpected_count=details.get("unexpected_count"),
        element_count=details.get("element_count"),
        observed_value=details.get("observed_value"),
        examples=_distinct(details.get("partial_unexpected_list") or [])[:5],
        missing=list(details.get("partial_missing_list") or [])[:5],
        expected=expected,
        error=error,
    )


def _why_absent(column: str) -> str:
    if column == CONVERSION_PER_CLICK:
        return f"derived from {list(LABEL_COLUMNS)}, which are missing or not numeric"
    for suffix in (LENGTH_SUFFIX, MIN_ID_SUFFIX):
        if column.endswith(suffix):
            return f"derived from '{column.removesuffix(suffix)}', which is missing or not a list"
    return f"column '{column}' not in the table"


def _exception_message(info: dict) -> str | None:
    """GX reports a failed metric either flat or keyed by metric id: the first message."""
    entries = [info] if "raised_exception" in info else list(info.values())
    for entry in entries:
        if entry.get("raised_exception", True) and entry.get("exception_message"):
            return str(entry["exception_message"]).strip().splitlines()[0]
    return None


def _counts_and_observed(outcome: ExpectationOutcome) -> list[str]:
    counts = (
        f"{outcome.unexpected_count:,} / {outcome.element_count:,}" if outcome.counts_rows else ""
    )
    if outcome.error:
        observed = outcome.error
    elif outcome.examples:
        observed = f"e.g. {outcome.examples}"
    elif outcome.missing:
        observed = f"missing {outcome.missing}"
    elif outcome.observed_value is not None:
        observed = _short(outcome.observed_value)
    else:
        observed = ""
    return [counts, observed]


def _distinct(values: list) -> list:
    seen: list = []
    for value in values:
        if value not in seen:
            seen.append(value)
    return seen


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _pandas_column(column: pa.ChunkedArray) -> pd.Series:
    """NumPy where it is exact (GX vectorises its range checks only for NumPy numbers);
    nullable pandas dtypes for integers with nulls, strings and booleans; lists stay Arrow."""
    arrow_type = column.type
    if pa.types.is_integer(arrow_type) and column.null_count:
        dtype = NULLABLE_INTEGERS[arrow_type]
    elif pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type):
        dtype = pd.StringDtype()
    elif pa.types.is_boolean(arrow_type):
        dtype = pd.BooleanDtype()
    elif _is_list(arrow_type):
        dtype = pd.ArrowDtype(arrow_type)
    else:
        return column.to_pandas()
    return column.to_pandas(types_mapper={arrow_type: dtype}.get)


def _is_integer(arrow_type: pa.DataType | None) -> bool:
    return arrow_type is not None and pa.types.is_integer(arrow_type)


def _is_numeric(arrow_type: pa.DataType) -> bool:
    return (
        pa.types.is_integer(arrow_type)
        or pa.types.is_floating(arrow_type)
        or pa.types.is_boolean(arrow_type)
    )


def _is_list(arrow_type: pa.DataType | None) -> bool:
    return arrow_type is not None and (
        pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type)
    )


def _is_integer_list(arrow_type: pa.DataType | None) -> bool:
    return _is_list(arrow_type) and pa.types.is_integer(arrow_type.value_type)
