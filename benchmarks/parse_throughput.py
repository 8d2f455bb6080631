"""Raw Ali-CCP parsing: ``esmm.data.aliccp.read_aliccp_raw`` against a plain Python parser.

A canonical Ali-CCP table is generated (default 300,000 impressions, about 58 per user as in the
real training file, whose 42.3M impressions share 730k common-feature records) and written with
``write_aliccp_raw`` into a temporary folder: a skeleton file and a common-features file. User
fields live in the common-features records: single fields 101 (user id), 121, 122, 124-129 and
the multi-valued 109_14, 110_14, 127_14 and 150_14 with 0-30 ids each. The skeleton line holds
the item fields 205, 206, 207, 216, the multi-valued 210 (0-5 ids), the combination fields 508,
509, 702, 853 (5% missing) and the context field 301. Feature ids are global integers of 6 to 9
digits, as in the raw files.

Both parsers read both files, and lines/s is skeleton lines / total seconds (median of repeats
after a warm-up); the same reads are also timed in this process's CPU seconds (all its threads),
which other jobs on the shared cores move less than wall time. ``read_aliccp_raw`` runs twice:
with its default ``workers`` (one thread per available core, parsing skeleton chunks in
parallel) and with ``workers=1`` (every chunk in the calling thread). The plain parser is
single-threaded, so the per-core figure (lines/s divided by the threads used) and the CPU-time
ratio are reported beside the wall-clock one. The plain parser is what one writes first: the
common-features file into a dict of field -> list of ids, then every skeleton line split with
``split(',')``, ``split('\\x01')``, ``split('\\x02')`` and ``split('\\x03')``, merged with its
user's record and appended to Python lists, one per column. It validates nothing and stops at
Python lists (no Arrow table), so it does less than ``read_aliccp_raw``, which validates every
line, counts and reports problems and returns an Arrow table. Row counts and id totals of both
are compared.

Memory per impression of this Ali-CCP-shaped table (Arrow and encoded with FeatureEncoder) is
reported too: with train_throughput.py's figures it sizes the full Ali-CCP training set.

For context (not the target): the plain parser followed by ``pa.table`` of its lists. The
profile of where the reader's time goes is of ``workers=1`` (cProfile sees only the thread that
starts it).
"""

from __future__ import annotations

import cProfile
import pstats
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from _common import median, parser, print_table, verdict, write_result

from esmm.data.aliccp import (
    ALICCP_FIELDS,
    ALICCP_MULTI_FIELDS,
    _available_cores,
    aliccp_schema,
    read_aliccp_raw,
    write_aliccp_raw,
)
from esmm.data.encode import FeatureEncoder

NAME = "parse_throughput"
TARGET_RATIO = 5.0
IMPRESSIONS_PER_USER = 58  # 42.3M training impressions / 730k common-feature records
# field -> (distinct ids, max ids per impression for multi fields)
USER_FIELDS = {
    "101": (10**6, 1),
    "121": (98, 1),
    "122": (14, 1),
    "124": (3, 1),
    "125": (8, 1),
    "126": (4, 1),
    "127": (3, 1),
    "128": (3, 1),
    "129": (5, 1),
    "109_14": (20_000, 30),
    "110_14": (200_000, 30),
    "127_14": (100_000, 30),
    "150_14": (50_000, 30),
}
IMPRESSION_FIELDS = {
    "205": (400_000, 1),
    "206": (8_000, 1),
    "207": (200_000, 1),
    "210": (80_000, 5),
    "216": (80_000, 1),
    "508": (9_000, 1),
    "509": (300_000, 1),
    "702": (200_000, 1),
    "853": (100_000, 1),
    "301": (3, 1),
}
MISSING_SHARE = {"508": 0.05, "509": 0.05, "702": 0.05, "853": 0.05}


def make_aliccp_table(n_rows: int, seed: int) -> pa.Table:
    """A canonical Ali-CCP table: rows grouped by user (as the skeleton file is), user fields
    constant per user, global feature ids (each field owns a range of ids)."""
    rng = np.random.default_rng(seed)
    n_users = max(1, n_rows // IMPRESSIONS_PER_USER)
    user = np.sort(rng.integers(0, n_users, n_rows))
    base = {name: 100_000 + i * 10_000_000 for i, name in enumerate(ALICCP_FIELDS)}

    def draw(name: str, n: int, spec: tuple[int, int]) -> pa.Array:
        vocab, max_len = spec
        if name in ALICCP_MULTI_FIELDS:
            low = 1 if name == "210" else 0
            lengths = rng.integers(low, max_len + 1, n)
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            ids = base[name] + rng.integers(0, vocab, int(offsets[-1]))
            return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(ids))
        ids = pa.array(base[name] + rng.integers(0, vocab, n))
        if name in MISSING_SHARE:
            ids = pc.if_else(pa.array(rng.random(n) < MISSING_SHARE[name]), None, ids)
        return ids

    columns = {
        name: draw(name, n_users, spec).take(pa.array(user)) for name, spec in USER_FIELDS.items()
    }
    columns.update({name: draw(name, n_rows, spec) for name, spec in IMPRESSION_FIELDS.items()})
    click = rng.random(n_rows) < 0.04
    conversion = click & (rng.random(n_rows) < 0.006 / 0.04)
    return pa.table(
        {
            "sample_id": pa.array(np.arange(1, n_rows + 1)),
            "click": pa.array(click.astype(np.int8)),
            "conversion": pa.array(conversion.astype(np.int8)),
            **{name: columns[name] for name in ALICCP_FIELDS},
        }
    )


def plain_parse(skeleton: Path, common: Path) -> dict[str, list]:
    """The straightforward parser: split strings, dicts and Python lists, no validation."""
    records: dict[str, dict[str, list[int]]] = {}
    with open(common) as handle:
        for line in handle:
            index, _count, features = line.rstrip("\n").split(",")
            record: dict[str, list[int]] = {}
            for feature in features.split("\x01"):
                field, rest = feature.split("\x02")
                feature_id, _value = rest.split("\x03")
                record.setdefault(field, []).append(int(feature_id))
            records[index] = record
    columns: dict[str, list] = {name: [] for name in ("sample_id", "click", "conversion")}
    columns.update({name: [] for name in ALICCP_FIELDS})
    fields = set(ALICCP_FIELDS)
    with open(skeleton) as handle:
        for line in handle:
            sample_id, click, conversion, index, _count, features = line.rstrip("\n").split(",")
            row = dict(records[index])
            own: dict[str, list[int]] = {}
            if features:
                for feature in features.split("\x01"):
                    field, rest = feature.split("\x02")
                    feature_id, _value = rest.split("\x03")
                    own.setdefault(field, []).append(int(feature_id))
            row.update(own)
            columns["sample_id"].append(int(sample_id))
            columns["click"].append(int(click))
            columns["conversion"].append(int(conversion))
            for name in fields:
                ids = row.get(name)
                if name in ALICCP_MULTI_FIELDS:
                    columns[name].append(ids or [])
                else:
                    columns[name].append(ids[0] if ids else None)
    return columns


def id_totals_ours(table: pa.Table) -> dict[str, int]:
    return {
        name: len(pc.list_flatten(table[name]))
        if name in ALICCP_MULTI_FIELDS
        else len(table[name]) - table[name].null_count
        for name in ALICCP_FIELDS
    }


def id_totals_plain(columns: dict[str, list]) -> dict[str, int]:
    return {
        name: sum(len(v) for v in columns[name])
        if name in ALICCP_MULTI_FIELDS
        else sum(v is not None for v in columns[name])
        for name in ALICCP_FIELDS
    }


PHASES = {  # read_aliccp_raw's internal steps, as named in esmm/data/aliccp.py
    "_iter_chunks": "read the file in chunks, count lines",
    "_split_lines": "split lines",
    "_parse": "validate and tokenise lines",
    "_tokenize": "... of which: features from the bytes",
    "_eight_digits": "... ... of which: decimal ids (SWAR)",
    "lookup": "... ... of which: field names (hash table)",
    "_assemble": "assemble rows: user fields from common records",
    "build": "... of which: build the columns (Arrow take of the records)",
    "_duplicates": "count duplicate rows (content hash)",
    "_load_common": "load the common-features file",
}


def profile_reader(read: Callable[[], object]) -> dict:
    """cProfile of one read: seconds inside the reader's main steps, and the top functions by
    own time."""
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    read()
    profiler.disable()
    wall = time.perf_counter() - start
    stats = pstats.Stats(profiler).stats  # (file, line, name) -> (cc, nc, tt, ct, callers)
    phases: dict[str, float] = {}
    for (file, _line, name), (_cc, _nc, _tt, cumulative, _callers) in stats.items():
        if file.endswith("aliccp.py") and name in PHASES:
            phases[name] = phases.get(name, 0.0) + cumulative
    top = sorted(stats.items(), key=lambda item: item[1][2], reverse=True)[:10]
    return {
        "wall_seconds_under_profiler": wall,
        "phases": {
            name: {"what": PHASES[name], "seconds": phases[name]}
            for name in PHASES
            if name in phases
        },
        "top_own_time": [
            {"function": f"{Path(file).name}:{name}", "calls": nc, "seconds": tt}
            for (file, _line, name), (_cc, nc, tt, _ct, _callers) in top
        ],
    }


def encoded_bytes(table: pa.Table) -> int:
    features = FeatureEncoder.fit(table, aliccp_schema(), min_count=1).transform(table)
    tensors = [features.single_ids, features.dense, *features.multi_values, *features.multi_offsets]
    return sum(t.numel() * t.element_size() for t in tensors) + 2 * 4 * table.num_rows


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--rows", type=int, default=300_000, help="impressions in the generated file")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each parser")
    args = p.parse_args()
    if args.quick:
        args.rows, args.repeats = 20_000, 1

    table = make_aliccp_table(args.rows, seed=4)
    with tempfile.TemporaryDirectory(prefix="esmm-parse-bench-") as tmp:
        skeleton, common = Path(tmp) / "sample_skeleton.csv", Path(tmp) / "common_features.csv"
        write_aliccp_raw(table, skeleton, common)
        sizes = {"skeleton_bytes": skeleton.stat().st_size, "common_bytes": common.stat().st_size}
        common_lines = common.read_bytes().count(b"\n")

        def ours(workers: int | None = None) -> pa.Table:
            out, report = read_aliccp_raw(skeleton, common, progress=False, workers=workers)
            assert report.malformed == 0 and report.rows_kept == args.rows, report.summary()
            return out

        def timed_reads(workers: int | None) -> tuple[list[float], list[float], pa.Table]:
            """Wall and CPU seconds (all threads: less moved by other jobs) of repeated reads."""
            ours(workers)  # warm-up
            seconds, cpu_seconds = [], []
            for _ in range(args.repeats):
                start, cpu = time.perf_counter(), time.process_time()
                out = ours(workers)
                seconds.append(time.perf_counter() - start)
                cpu_seconds.append(time.process_time() - cpu)
            return seconds, cpu_seconds, out

        workers = _available_cores()  # read_aliccp_raw's default
        ours_seconds, ours_cpu, parsed = timed_reads(None)
        one_seconds, one_cpu, one_parsed = timed_reads(1)
        plain_seconds, arrow_seconds, plain_cpu = [], [], []
        for _ in range(args.repeats):
            start, cpu = time.perf_counter(), time.process_time()
            columns = plain_parse(skeleton, common)
            plain_seconds.append(time.perf_counter() - start)
            plain_cpu.append(time.process_time() - cpu)
            start = time.perf_counter()
            pa.table({name: pa.array(values) for name, values in columns.items()})
            arrow_seconds.append(time.perf_counter() - start)
        where = profile_reader(lambda: ours(1))

    same_rows = len(columns["click"]) == parsed.num_rows == args.rows
    same_ids = id_totals_ours(parsed) == id_totals_plain(columns) == id_totals_ours(table)
    if not (same_rows and same_ids and one_parsed.equals(parsed)):
        raise SystemExit("the parsers disagree on the rows or ids read: not comparable")
    del columns, one_parsed

    ours_rate = args.rows / median(ours_seconds)
    plain_rate = args.rows / median(plain_seconds)
    plain_arrow_seconds = [a + b for a, b in zip(plain_seconds, arrow_seconds, strict=True)]
    plain_arrow_rate = args.rows / median(plain_arrow_seconds)
    one_rate = args.rows / median(one_seconds)
    ratio = ours_rate / plain_rate
    one_ratio = one_rate / plain_rate
    per_core_ratio = ratio / workers  # the plain parser uses one core
    cpu_ratio = median(plain_cpu) / median(ours_cpu)
    one_cpu_ratio = median(plain_cpu) / median(one_cpu)
    total_bytes = sizes["skeleton_bytes"] + sizes["common_bytes"]
    multi_ids = sum(len(pc.list_flatten(table[n])) for n in ALICCP_MULTI_FIELDS)
    memory = {
        "arrow_bytes_per_row": parsed.nbytes / args.rows,
        "encoded_bytes_per_row": encoded_bytes(parsed) / args.rows,
        "multi_ids_per_row": multi_ids / args.rows,
    }
    print_table(
        ["parser", "lines/s", "MB/s", "x plain (to lists)"],
        [
            [name, rate, total_bytes * rate / args.rows / 1e6, rate / plain_rate]
            for name, rate in (
                (f"read_aliccp_raw, {workers} workers (default)", ours_rate),
                ("read_aliccp_raw, 1 worker", one_rate),
                ("plain Python, to lists (1 thread)", plain_rate),
                ("plain Python, to lists, then pa.table", plain_arrow_rate),
            )
        ],
        f"Parsing {args.rows:,} skeleton lines + {common_lines:,} common-feature lines "
        f"({total_bytes / 1e6:.1f} MB)",
    )
    print_table(
        ["parser", "median CPU seconds", "x plain"],
        [
            [f"read_aliccp_raw, {workers} workers", median(ours_cpu), cpu_ratio],
            ["read_aliccp_raw, 1 worker", median(one_cpu), one_cpu_ratio],
            ["plain Python, to lists", median(plain_cpu), 1.0],
        ],
        "The same reads in this process's CPU time, all threads (other jobs' load moves it less)",
    )
    print_table(
        ["target", "measured", "goal", "verdict"],
        [
            [
                f"read_aliccp_raw ({workers} threads) / plain parser (1 thread)",
                ratio,
                TARGET_RATIO,
                verdict(ratio, TARGET_RATIO),
            ],
            ["... per core (the ratio / threads)", per_core_ratio, "-", "-"],
        ],
        "Target",
    )
    print_table(
        ["step of read_aliccp_raw", "seconds", "share"],
        [
            [
                f"{v['what']} ({k})",
                v["seconds"],
                v["seconds"] / where["wall_seconds_under_profiler"],
            ]
            for k, v in where["phases"].items()
        ],
        f"Where read_aliccp_raw's time goes (cProfile, one read: "
        f"{where['wall_seconds_under_profiler']:.2f} s under the profiler)",
    )
    print_table(
        ["quantity", "value"],
        [[k.replace("_", " "), v] for k, v in memory.items()],
        "This Ali-CCP-shaped table in memory",
    )
    write_result(
        NAME,
        args,
        {
            "rows": args.rows,
            "common_feature_lines": common_lines,
            **sizes,
            "workers": workers,
            "ours_lines_per_s": ours_rate,
            "ours_one_worker_lines_per_s": one_rate,
            "plain_lines_per_s": plain_rate,
            "ours_seconds": ours_seconds,
            "ours_one_worker_seconds": one_seconds,
            "plain_seconds": plain_seconds,
            "ours_cpu_seconds": ours_cpu,
            "ours_one_worker_cpu_seconds": one_cpu,
            "plain_cpu_seconds": plain_cpu,
            "cpu_ratio": cpu_ratio,
            "one_worker_cpu_ratio": one_cpu_ratio,
            "plain_to_arrow_seconds": arrow_seconds,
            "plain_then_arrow_lines_per_s": plain_arrow_rate,
            "ratio": ratio,
            "one_worker_ratio": one_ratio,
            "per_core_ratio": per_core_ratio,
            "outputs_agree": True,
            "memory": memory,
            "profile": where,
            "targets": [
                {
                    "name": f"read_aliccp_raw ({workers} threads) / plain parser (1 thread)",
                    "measured": ratio,
                    "target": TARGET_RATIO,
                    "met": ratio >= TARGET_RATIO,
                }
            ],
        },
    )


if __name__ == "__main__":
    main()
