"""Run every benchmark, then regenerate benchmarks/RESULTS.md from their JSON result files.

Run it under the team's CPU lock so that no other heavy job shares the cores:

    flock /tmp/esmm-cpu.lock .venv/bin/python benchmarks/run_all.py

``--report-only`` rewrites RESULTS.md from the JSON files already in benchmarks/results/;
``--quick`` runs every script's smoke size and writes benchmarks/results/RESULTS.quick.md
instead (quick figures are not measurements). The hand-written reading of the figures,
benchmarks/reading.md, is appended to RESULTS.md as is.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import time

from _common import BENCH_DIR, RESULTS_DIR, command_line, lock_held_elsewhere, median

SCRIPTS = (  # machine_limit reads train_throughput's result, so it runs after it
    "train_throughput",
    "score_throughput",
    "machine_limit",
    "parse_throughput",
    "simulator_throughput",
    "serve_latency",
)
ALICCP_TRAIN_ROWS = 42_300_135
ALICCP_TEST_ROWS = 43_016_840
EMBEDDING_DIM = 18


def run_scripts(names: list[str], quick: bool) -> dict[str, float]:
    seconds = {}
    for name in names:
        cmd = [sys.executable, str(BENCH_DIR / f"{name}.py"), *(["--quick"] if quick else [])]
        print(f"\n=== {name} ===", flush=True)
        start = time.perf_counter()
        subprocess.run(cmd, check=True)
        seconds[name] = time.perf_counter() - start
        print(f"=== {name}: {seconds[name]:.0f} s ===", flush=True)
    return seconds


# --------------------------------------------------------------------------- formatting


def num(value: float | int | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, int) or abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.{digits}g}"


def table(headers: list[str], rows: list[list[object]]) -> str:
    def cell(v: object) -> str:
        return num(v) if isinstance(v, int | float) and not isinstance(v, bool) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def spread(values: list[float]) -> str:
    """min-max of repeated measurements, to show the run-to-run noise."""
    return f"{num(min(values))}-{num(max(values))}" if len(values) > 1 else "-"


def verdict(measured: float, goal: float) -> str:
    return "**pass**" if measured >= goal else "**MISS**"


def load(name: str, quick: bool) -> dict | None:
    path = RESULTS_DIR / (f"{name}.quick.json" if quick else f"{name}.json")
    return json.loads(path.read_text()) if path.exists() else None


# --------------------------------------------------------------------------- report


def report(quick: bool, run_seconds: dict[str, float]) -> str:
    results = {name: load(name, quick) for name in SCRIPTS}
    present = {k: v for k, v in results.items() if v is not None}
    if not present:
        raise SystemExit(f"no result files in {RESULTS_DIR}; run the benchmarks first")
    train, score = results["train_throughput"], results["score_throughput"]
    limit, parse = results["machine_limit"], results["parse_throughput"]
    sim = results["simulator_throughput"]
    serve = results["serve_latency"]
    machine = next(iter(present.values()))["machine"]
    out: list[str] = []
    add = out.append

    add("# Benchmark results" + (" (QUICK smoke sizes: not measurements)" if quick else ""))
    add("")
    unlocked = [f"{k}.py" for k, v in present.items() if not v.get("cpu_lock_held")]
    add(
        f"Generated {dt.datetime.now(dt.UTC).isoformat(timespec='seconds')} by "
        f"`{command_line()}`. "
        + (
            "Every script ran while `/tmp/esmm-cpu.lock` was held (no other heavy job on the "
            "cores)."
            if not unlocked
            else f"NOT run under the CPU lock: {', '.join(unlocked)} (figures may include "
            "other jobs' load)."
        )
    )
    add("Regenerate with `flock /tmp/esmm-cpu.lock .venv/bin/python benchmarks/run_all.py`; the")
    add("figures below are read from `benchmarks/results/*.json`, one file per script.")
    add("")
    add("## Machine")
    add("")
    add(
        table(
            ["", ""],
            [
                ["CPU", machine["cpu_model"]],
                [
                    "cores",
                    f"{machine['cpus_available']} available of {machine['logical_cpus']} logical",
                ],
                ["SIMD", ", ".join(machine["simd"])],
                ["memory", f"{machine['memory_bytes'] / 2**30:.1f} GiB"],
                ["Python", machine["python"]],
                ["torch", f"{machine['torch']}, {machine['torch_threads']} threads"],
                ["numpy / pyarrow", f"{machine['numpy']} / {machine['pyarrow']}"],
                [
                    "code",
                    f"git {machine['git_commit']}"
                    + (" with uncommitted changes" if machine["git_dirty"] else ""),
                ],
            ],
        )
    )
    add("")
    add(
        table(
            ["script", "command", "date (UTC)", "run s", "other processes' CPU"],
            [
                [
                    f"{name}.py",
                    f"`{r['command']}`",
                    r["date"],
                    num(run_seconds.get(name, r.get("cpu_accounting", {}).get("wall_seconds"))),
                    f"{100 * r['cpu_accounting']['other_processes_share_of_machine']:.1f}% "
                    f"of the machine",
                ]
                for name, r in present.items()
            ],
        )
    )
    add("")

    # ---- targets
    add("## Targets")
    add("")
    rows = []
    if train:
        small, big = train["tables"].get("small"), train["tables"].get("big")
        if small:
            v = small["ours"]["samples_per_s"]
            rows.append(
                ["training, small vocabularies (samples/s)", v, "≥ 70,000", verdict(v, 7e4)]
            )
        if small and big:
            r = big["ours"]["samples_per_s"] / small["ours"]["samples_per_s"]
            rows.append(["training, million-id table / small", r, "≥ 0.70", verdict(r, 0.7)])
        for kind, t in train["tables"].items():
            rows.append(
                [f"training, ours / plain loop ({kind})", t["ratio"], "≥ 3", verdict(t["ratio"], 3)]
            )
    if score:
        for precision, r in score["by_precision"].items():
            v = r["samples_per_s"]
            name = f"scoring, batch {score['batch_size']}, {precision} (samples/s)"
            rows.append([name, v, "≥ 500,000", verdict(v, 5e5)])
    if parse:
        threads = parse.get("workers", 1)
        rows.append(
            [
                f"raw Ali-CCP parsing, ours ({threads} threads) / plain parser (1 thread)",
                parse["ratio"],
                "≥ 5",
                verdict(parse["ratio"], 5),
            ]
        )
    add(table(["target", "measured", "goal", "verdict"], rows))
    add("")
    add("Targets are goals, not assertions; every figure is the library as it is in the working")
    add("tree. Prototypes of library changes are measured beside it and named as such.")
    add("")

    if train:
        add(training_section(train, limit))
    if score:
        add(scoring_section(score))
    if limit:
        add(limit_section(limit))
    if parse:
        add(parse_section(parse))
    if train or parse:
        add(memory_section(train, parse))
    if sim:
        add(simulator_section(sim))
    if serve:
        add(serve_section(serve))
    reading = BENCH_DIR / "reading.md"
    if reading.exists() and not quick:
        add(reading.read_text().rstrip() + "\n")
    return "\n".join(out)


def training_section(train: dict, limit: dict | None) -> str:
    s = train["settings"]
    lim = limit["limit_samples_per_s"] if limit else None
    out = [
        "## 1. Training throughput (`train_throughput.py`)",
        "",
        f"{s['fields']} single-id fields, embedding {s['embedding_dim']}, towers "
        f"{'-'.join(map(str, s['tower_dims']))}, batch {s['batch_size']}, Adam(0.9, 0.999, 1e-8), "
        f"{s['threads']} threads. *ours*: `esmm.train.train_model` (SparseAdam + Adam), median "
        "samples/s of the measured epochs after a warm-up. *plain*: Dataset returning a dict of "
        "per-field tensors per row, DataLoader(batch_size=1024, shuffle=True), nn.Embedding per "
        "field, Adam over everything; *plain packed*: the same with one [23] id tensor per row. "
        "*ours + proposed*: train_model with the optimizer prototype of "
        "`benchmarks/_prototypes.py` (LazyAdam + fused Adam)."
        + (f" *limit*: the matrix multiplies alone ({num(lim)} samples/s, §3)." if lim else ""),
        "",
    ]
    rows = []
    for kind, t in train["tables"].items():
        ours = t["ours"]["samples_per_s"]
        rows.append(
            [
                kind,
                t["rows"],
                t["vocabulary_of_big_field"],
                t["embedding_rows"],
                ours,
                spread(t["ours"]["epoch_samples_per_s"]),
                t["ours_proposed"]["samples_per_s"],
                t["plain"]["samples_per_s"],
                t["plain_packed"]["samples_per_s"],
                t["ratio"],
                t["ratio_packed"],
                "-" if lim is None else f"{100 * ours / lim:.0f}%",
            ]
        )
    out.append(
        table(
            [
                "table",
                "rows",
                "ids in 205",
                "embedding rows",
                "ours",
                "ours, epochs min-max",
                "ours + proposed",
                "plain",
                "plain packed",
                "ours / plain",
                "ours / packed",
                "ours / limit",
            ],
            rows,
        )
    )
    out += ["", "Where a step's time goes (median ms per step over the breakdown steps):", ""]
    headers, columns = ["phase"], []
    for kind, t in train["tables"].items():
        for variant, phases in t["breakdown_seconds_per_step"].items():
            headers.append(f"{kind}, {variant}")
            columns.append(phases)
    phases = list(columns[0])
    rows = [[p, *(f"{c[p] * 1000:.2f}" for c in columns)] for p in phases]
    rows.append(["total", *(f"{sum(c.values()) * 1000:.2f}" for c in columns)])
    rows.append(["=> samples/s", *(num(s["batch_size"] / sum(c.values())) for c in columns)])
    out.append(table(headers, rows))
    out.append("")
    for kind, t in train["tables"].items():
        e = t["proposed_equivalence"]
        out.append(
            f"- {kind}: after {e['steps']} identical steps the proposed optimizers' weights differ "
            f"from the library's by at most {e['max_abs_weight_difference']:.1e} (float rounding)."
        )
    for kind, t in train["tables"].items():
        if "profile" in t:
            top = t["profile"][:6]
            shown = ", ".join(
                f"{e['op']} {e['self_ms_per_step']:.2f} ms ({100 * e['share']:.0f}%)" for e in top
            )
            out.append(f"- torch.profiler, {kind} table, self CPU per step: {shown}.")
    out.append("")
    return "\n".join(out)


def scoring_section(score: dict) -> str:
    rows = [
        [
            precision,
            b,
            score["rows"],
            r["samples_per_s"],
            spread([score["rows"] / x for x in r["seconds"]]),
            r["forward_limit_samples_per_s"],
            f"{100 * r['samples_per_s'] / r['forward_limit_samples_per_s']:.0f}%",
        ]
        for precision, result in score["by_precision"].items()
        for b, r in result["by_batch_size"].items()
    ]
    d = score["bfloat16_difference"]
    auc32, auc16 = (score["by_precision"][p]["auc"] for p in ("float32", "bfloat16"))
    aucs = [[name, auc32[name], auc16[name], diff] for name, diff in d["auc"].items()]
    tops = {
        precision: ", ".join(f"{e['op']} {100 * e['share']:.0f}%" for e in where[:4])
        for precision, where in score["profile"].items()
    }
    return "\n".join(
        [
            "## 2. Scoring throughput (`score_throughput.py`)",
            "",
            "`esmm.train.predict` over the small-vocabulary table (pCTR and pCVR of every row), "
            f'in float32 (the default) and with `precision="bfloat16"`, on weights trained for '
            f"one epoch on {score['train_rows']:,} rows whose labels depend on the ids; *forward "
            "limit*: the towers' forward matrix multiplies alone at that batch size and precision.",
            "",
            table(
                [
                    "precision",
                    "batch",
                    "rows",
                    "samples/s",
                    "repeats min-max",
                    "forward limit",
                    "share of limit",
                ],
                rows,
            ),
            "",
            f"bfloat16 against float32, same rows and weights: pCVR differs by at most "
            f"{d['max_abs_pcvr']:.1e} (mean {d['mean_abs_pcvr']:.1e}), pCTR by at most "
            f"{d['max_abs_pctr']:.1e} (mean {d['mean_abs_pctr']:.1e}).",
            "",
            table(["AUC", "float32", "bfloat16", "bfloat16 - float32"], aucs),
            "",
            *(
                f"- torch.profiler, {precision}, share of self CPU time in one predict call: {top}."
                for precision, top in tops.items()
            ),
            "",
        ]
    )


def limit_section(limit: dict) -> str:
    rows = [
        [
            r["shape"],
            r["per_step"],
            f"{r['seconds'] * 1e6:.0f}",
            2 * r["m"] * r["k"] * r["n"] / r["seconds"] / 1e9,
        ]
        for r in limit["shapes"]
    ]
    f = limit["flops_per_sample"]
    out = [
        "## 3. Machine limit (`machine_limit.py`)",
        "",
        "float32 `torch.matmul` on the training step's shapes (both towers); embedding gathers, "
        "bias, ReLU, loss and optimizer steps are not counted.",
        "",
        table(["multiply", "per step", "µs each", "GFLOP/s"], rows),
        "",
        table(
            ["quantity", "value"],
            [
                [
                    "FLOPs per training sample (fwd 2·in·out per Linear per tower, bwd 2× fwd)",
                    f["training"],
                ],
                ["measured GFLOP/s on these shapes", limit["measured_flops_per_s"] / 1e9],
                [
                    "**limit, samples/s** (= measured FLOP/s / FLOPs per sample)",
                    limit["limit_samples_per_s"],
                ],
                [
                    "limit with both first layers fused into one [414, 400] multiply",
                    limit["fused_first_layer_limit_samples_per_s"],
                ],
                [
                    f"large square matmul {limit['square_matmul']['size']}³, GFLOP/s",
                    limit["square_matmul"]["flops_per_s"] / 1e9,
                ],
                [
                    "same shapes in bfloat16: limit, samples/s (reference)",
                    limit["bfloat16_limit_samples_per_s"],
                ],
            ]
            + [
                [f"ours ({k} table) / limit", f"{100 * v:.0f}%"]
                for k, v in (limit.get("ours_over_limit") or {}).items()
            ],
        ),
        "",
    ]
    return "\n".join(out)


def parse_section(parse: dict) -> str:
    workers = parse["workers"]
    rows = [
        [
            f"`read_aliccp_raw`, {workers} workers (the default: one per core)",
            parse["ours_lines_per_s"],
            spread([parse["rows"] / x for x in parse["ours_seconds"]]),
            parse["ratio"],
        ],
        [
            "`read_aliccp_raw`, `workers=1`",
            parse["ours_one_worker_lines_per_s"],
            spread([parse["rows"] / x for x in parse["ours_one_worker_seconds"]]),
            parse["one_worker_ratio"],
        ],
        [
            "plain Python parser, to lists, 1 thread (**the target's baseline**)",
            parse["plain_lines_per_s"],
            spread([parse["rows"] / x for x in parse["plain_seconds"]]),
            1.0,
        ],
        [
            "plain Python parser, then `pa.table` of its lists",
            parse["plain_then_arrow_lines_per_s"],
            "-",
            parse["plain_then_arrow_lines_per_s"] / parse["plain_lines_per_s"],
        ],
    ]
    total = parse["skeleton_bytes"] + parse["common_bytes"]
    prof = parse.get("profile")
    out = [
        "## 4. Raw Ali-CCP parsing (`parse_throughput.py`)",
        "",
        f"{parse['rows']:,} skeleton lines and {parse['common_feature_lines']:,} common-feature "
        f"lines ({total / 1e6:.0f} MB) written by `write_aliccp_raw`; "
        f"{parse['memory']['multi_ids_per_row']:.0f} multi-field ids per impression. "
        "lines/s = skeleton lines / seconds to read both files; both parsers' row counts and id "
        "totals agree.",
        "",
        table(["parser", "lines/s", "repeats min-max", "× plain"], rows),
        "",
    ]
    ours_cpu, one_cpu, plain_cpu = (
        median(parse[k])
        for k in ("ours_cpu_seconds", "ours_one_worker_cpu_seconds", "plain_cpu_seconds")
    )
    out += [
        f"Per core: {workers} threads give {parse['ratio']:.2f}× the single-threaded plain "
        f"parser, {parse['per_core_ratio']:.2f}× per core. In this process's CPU time, all "
        f"threads (less moved by other jobs on the cores): `read_aliccp_raw` {ours_cpu:.2f} s "
        f"with {workers} workers ({parse['cpu_ratio']:.2f}× less than the plain parser), "
        f"{one_cpu:.2f} s with 1 ({parse['one_worker_cpu_ratio']:.2f}×), the plain parser "
        f"{plain_cpu:.2f} s.",
        "",
    ]
    if prof:
        wall = prof["wall_seconds_under_profiler"]
        out.append(
            f"Where `read_aliccp_raw`'s time goes with `workers=1` (cProfile, one read, "
            f"{wall:.2f} s):"
        )
        out.append("")
        out.append(
            table(
                ["step", "seconds", "share"],
                [
                    [
                        f"{v['what'].strip()} (`{k}`)",
                        f"{v['seconds']:.3f}",
                        f"{100 * v['seconds'] / wall:.0f}%",
                    ]
                    for k, v in prof["phases"].items()
                ],
            )
        )
        out.append("")
    return "\n".join(out)


def memory_section(train: dict | None, parse: dict | None) -> str:
    out = [
        "## Memory per impression, and the full Ali-CCP against 24 GB",
        "",
    ]
    rows = []
    if train:
        for kind, t in train["tables"].items():
            m = t["memory"]
            rows.append(
                [
                    f"train_throughput, {kind} (23 single ids)",
                    m["arrow_table_bytes_per_row"],
                    m["encoded_split_bytes_per_row"],
                    m["rss_encode_delta_per_row"],
                    f"{m['peak_rss_train_over_before_train_bytes'] / 2**20:.0f} MiB",
                    f"{m['peak_rss_train_bytes'] / 2**20:,.0f} MiB",
                ]
            )
    if parse:
        m = parse["memory"]
        rows.append(
            [
                f"parse_throughput, Ali-CCP-shaped ({m['multi_ids_per_row']:.0f} multi ids/row)",
                m["arrow_bytes_per_row"],
                m["encoded_bytes_per_row"],
                "-",
                "-",
                "-",
            ]
        )
    out.append(
        table(
            [
                "table",
                "Arrow B/row",
                "encoded B/row",
                "RSS growth of encoding, B/row",
                "training peak over RSS before training",
                "process peak RSS while training",
            ],
            rows,
        )
    )
    out.append("")
    gib = 2**30
    if parse:
        m = parse["memory"]
        arrow, enc = m["arrow_bytes_per_row"], m["encoded_bytes_per_row"]
        pipeline = arrow * (ALICCP_TRAIN_ROWS + ALICCP_TEST_ROWS) + (enc + 8) * ALICCP_TRAIN_ROWS
        training_only = (arrow + enc + 8) * ALICCP_TRAIN_ROWS
        encoded_only = (enc + 8) * ALICCP_TRAIN_ROWS
        out += [
            f"Projection with the Ali-CCP-shaped figures ({m['multi_ids_per_row']:.0f} multi ids "
            "per impression; each further id costs 8 B in Arrow and 4 B encoded):",
            "",
            table(
                ["what is held", "GiB"],
                [
                    [
                        "`esmm train` as written: `load_prepared` reads train, val and test Arrow "
                        "tables (42.3M + 43.0M rows), plus encoded train/val and the permutation",
                        f"{pipeline / gib:.1f}",
                    ],
                    [
                        "training split only: Arrow + encoded + permutation (42.3M rows)",
                        f"{training_only / gib:.1f}",
                    ],
                    ["encoded training split + permutation alone", f"{encoded_only / gib:.1f}"],
                    [
                        "embedding table + 2 Adam moments, per million ids",
                        f"{3 * EMBEDDING_DIM * 4 * 1e6 / gib:.2f}",
                    ],
                ],
            ),
            "",
        ]
    return "\n".join(out)


def simulator_section(sim: dict) -> str:
    rows = [
        [r["rows"], r["rows_per_s"], f"{min(r['seconds']):.2f}", r["arrow_bytes_per_row"]]
        for r in sim["sizes"]
    ]
    return "\n".join(
        [
            "## 5. Simulator (`simulator_throughput.py`)",
            "",
            f"`simulate_impressions`, preset {sim['preset']!r}, 8 days; the first call (world "
            f"build + 10,000 rows) took {sim['first_call_seconds']:.2f} s and is not in the rates.",
            "",
            table(["rows", "rows/s", "best s", "Arrow B/row"], rows),
            "",
        ]
    )


def serve_section(serve: dict) -> str:
    m = serve["model"]
    rows = [
        [
            s["rows"],
            s["requests"],
            f"{s['p50_ms']:.1f}",
            f"{s['p99_ms']:.1f}",
            s["requests_per_s"],
            s["rows_per_s"],
            f"{s['in_process_p50_ms']:.1f}",
            s["body_bytes"],
        ]
        for s in serve["sizes"].values()
    ]
    cpu = serve["cpu_accounting"]
    others = cpu["other_processes_cpu_seconds"] - serve["server_cpu_seconds"]
    load = max(0.0, others) / (cpu["wall_seconds"] * serve["machine"]["logical_cpus"])
    return "\n".join(
        [
            "## 6. REST serving latency (`serve_latency.py`)",
            "",
            f"`{serve['server']}` serving a registry alias (embedding {m['embedding_dim']}, towers "
            f"{'-'.join(map(str, m['tower_dims']))}); `dataframe_records` requests sent one after "
            "another on one keep-alive connection, after warm-up requests; latency from send to "
            "the answer's last byte. *in-process*: the same rows through the loaded pyfunc "
            "model's predict, without HTTP and JSON. Client and server share the machine's "
            f"cores. The server used {serve['server_cpu_seconds']:.1f} CPU-s (counted as other "
            "processes' CPU in the table above: its uvicorn is not a child of the script); "
            f"other processes than the server used {100 * load:.1f}% of the machine. The "
            f"server answered /ping {serve['startup_seconds']:.1f} s after start. With fewer "
            "than 100 timed requests, p99 lies between the two slowest.",
            "",
            table(
                [
                    "rows/request",
                    "requests",
                    "p50 ms",
                    "p99 ms",
                    "requests/s",
                    "rows/s",
                    "in-process p50 ms",
                    "request bytes",
                ],
                rows,
            ),
            "",
        ]
    )


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--quick", action="store_true", help="smoke sizes; writes RESULTS.quick.md")
    p.add_argument("--report-only", action="store_true", help="only regenerate the report")
    p.add_argument("--only", default=",".join(SCRIPTS), help="comma-separated scripts to run")
    args = p.parse_args()

    if not args.report_only and not args.quick and lock_held_elsewhere() is not True:
        print(
            "warning: not run under `flock /tmp/esmm-cpu.lock`: other heavy jobs may share the "
            "cores and distort the figures",
            file=sys.stderr,
        )
    seconds = {} if args.report_only else run_scripts(args.only.split(","), args.quick)
    text = report(args.quick, seconds)
    path = RESULTS_DIR / "RESULTS.quick.md" if args.quick else BENCH_DIR / "RESULTS.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"\nreport written to {path.relative_to(BENCH_DIR.parent)}")


if __name__ == "__main__":
    main()
