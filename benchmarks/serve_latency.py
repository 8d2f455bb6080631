"""REST serving latency: MLflow's scoring server (``esmm serve``) answering requests of 1 row
and of 1000 rows, sequentially, from one keep-alive client connection.

The model has the default config's architecture (embedding 18, towers 200-80) trained for one
epoch on a small simulated table, is registered with alias champion in a temporary SQLite store
and served from ``models:/esmm-cvr-bench@champion`` by ``esmm.serving.serving_process`` (the
command ``esmm serve`` runs). Request rows are the test split's raw features as
``dataframe_records`` JSON (lists for multi-valued fields). After warm-up requests, each request
is timed from send to the last byte of the answer; p50/p99 are over the timed requests and
requests/s is their count over their total time. For comparison the same rows are scored in
process through the loaded pyfunc model (schema checks + ESMMPyfunc.predict, no HTTP or JSON).
Client and server share this machine's cores.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import median, parser, print_table, write_result

from esmm.config import load_config
from esmm.data.sources import simulate_to_file
from esmm.prepare import load_prepared, prepare
from esmm.serving import serving_process
from esmm.train import train_stage

NAME = "serve_latency"
MODEL_NAME = "esmm-cvr-bench"


def build_champion(folder: Path, rows: int):
    """Train, log and register the benchmark model; returns (config, test table, feature
    names)."""
    from mlflow.tracking import MlflowClient

    from esmm.models import load_trained_model
    from esmm.registry import register_version
    from esmm.tracking import Tracker

    store = f"sqlite:///{folder}/mlflow.db"
    config = load_config(
        None,
        [
            f"output_dir={folder / 'out'}",
            f"data.simulator.rows={rows}",
            "data.simulator.days=4",
            "train.epochs=1",
            f"tracking.tracking_uri={store}",
        ],
    )
    simulate_to_file(config)
    prepare(config)
    train_stage(config, progress=False)
    tracker = Tracker.start(config)
    test = load_prepared(config).tables["test"]
    model_uri = tracker.log_model(config.output_path / "model", test.slice(0, 20))
    tracker.finish()
    client = MlflowClient(store, store)
    version = register_version(client, model_uri, MODEL_NAME, tracker.run_id, {})
    client.set_registered_model_alias(MODEL_NAME, "champion", version)
    _, encoder, _ = load_trained_model(config.output_path / "model")
    return config, test, encoder.schema.names()


def server_cpu_seconds() -> float:
    """CPU seconds used so far by the scoring server: the process groups led by children of
    this process (``serving_process`` starts the server in its own group). Measured before
    the server stops, because its uvicorn process is not a child of ours and its time would
    otherwise count as other processes' load."""
    stats = {}
    for path in Path("/proc").glob("[0-9]*/stat"):
        try:  # fields after "(comm)": state ppid pgrp ... utime (12th) stime (13th)
            stats[int(path.parent.name)] = path.read_text().rsplit(")", 1)[1].split()
        except (OSError, ValueError):
            continue
    groups = {pid for pid, f in stats.items() if int(f[1]) == os.getpid() and int(f[2]) == pid}
    ticks = os.sysconf("SC_CLK_TCK")
    return sum((int(f[11]) + int(f[12])) / ticks for f in stats.values() if int(f[2]) in groups)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def time_requests(url: str, body: bytes, warmup: int, timed: int) -> list[float]:
    """Seconds per request, sequential on one keep-alive connection, after ``warmup``."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=120)
    headers = {"Content-Type": "application/json"}
    seconds = []
    for i in range(warmup + timed):
        start = time.perf_counter()
        connection.request("POST", "/invocations", body=body, headers=headers)
        response = connection.getresponse()
        answer = response.read()
        elapsed = time.perf_counter() - start
        if response.status != 200:
            raise RuntimeError(f"request failed ({response.status}): {answer[:500]!r}")
        if i >= warmup:
            seconds.append(elapsed)
    connection.close()
    return seconds


def in_process_seconds(model, frame, warmup: int, repeats: int) -> list[float]:
    """Seconds per pyfunc predict of ``frame`` in this process, after ``warmup`` calls."""
    for _ in range(warmup):
        model.predict(frame)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.predict(frame)
        seconds.append(time.perf_counter() - start)
    return seconds


def summary(seconds: list[float], rows: int) -> dict:
    total = sum(seconds)
    return {
        "requests": len(seconds),
        "p50_ms": 1000 * float(np.percentile(seconds, 50)),
        "p99_ms": 1000 * float(np.percentile(seconds, 99)),
        "mean_ms": 1000 * total / len(seconds),
        "max_ms": 1000 * max(seconds),
        "requests_per_s": len(seconds) / total,
        "rows_per_s": rows * len(seconds) / total,
    }


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--requests-1", type=int, default=200, help="timed 1-row requests")
    p.add_argument("--requests-1000", type=int, default=50, help="timed 1000-row requests")
    p.add_argument("--warmup", type=int, default=20, help="untimed requests before each size")
    p.add_argument("--table-rows", type=int, default=40_000, help="simulated rows for the model")
    args = p.parse_args()
    if args.quick:
        args.requests_1, args.requests_1000, args.warmup, args.table_rows = 20, 5, 2, 8000
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

    import mlflow.pyfunc
    import pandas as pd

    with tempfile.TemporaryDirectory(prefix="esmm-serve-latency-") as tmp:
        config, test, names = build_champion(Path(tmp), args.table_rows)
        model_uri = f"models:/{MODEL_NAME}@champion"
        started = time.perf_counter()
        with serving_process(model_uri, free_port(), config.tracking.tracking_uri) as url:
            startup_seconds = time.perf_counter() - started
            loaded = mlflow.pyfunc.load_model(model_uri)
            sizes = {}
            for rows, timed in ((1, args.requests_1), (1000, args.requests_1000)):
                records = test.select(names).slice(0, rows).to_pylist()
                body = json.dumps({"dataframe_records": records}).encode()
                warmup = max(1, args.warmup if rows == 1 else args.warmup // 4)
                seconds = time_requests(url, body, warmup, timed)
                local = in_process_seconds(loaded, pd.DataFrame(records), warmup, timed)
                sizes[str(rows)] = {
                    "rows": rows,
                    "body_bytes": len(body),
                    "warmup_requests": warmup,
                    **summary(seconds, rows),
                    "seconds": seconds,
                    "in_process_p50_ms": 1000 * median(local),
                }
            server_cpu = server_cpu_seconds()

    print_table(
        ["rows/request", "requests", "p50 ms", "p99 ms", "requests/s", "rows/s", "in-process ms"],
        [
            [
                s["rows"],
                s["requests"],
                s["p50_ms"],
                s["p99_ms"],
                s["requests_per_s"],
                s["rows_per_s"],
                s["in_process_p50_ms"],
            ]
            for s in sizes.values()
        ],
        f"POST /invocations, dataframe_records, sequential (server up in {startup_seconds:.1f} s)",
    )
    write_result(
        NAME,
        args,
        {
            "model": {
                "embedding_dim": config.model.embedding_dim,
                "tower_dims": list(config.model.tower_dims),
                "table_rows": args.table_rows,
            },
            "server": "mlflow models serve --env-manager local (uvicorn, 1 worker)",
            "startup_seconds": startup_seconds,
            "server_cpu_seconds": server_cpu,
            "sizes": sizes,
        },
    )


if __name__ == "__main__":
    main()
