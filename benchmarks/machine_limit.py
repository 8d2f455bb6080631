"""The machine's limit for ESMM training: measured matrix-multiply FLOP/s on the tower shapes.

A training step of the paper's model (23 fields x embedding 18 = 414 inputs, towers 200-80-1,
batch 1024) multiplies, per tower and per Linear(in, out):

- forward        [B, in]  x [in, out]     2*B*in*out FLOPs
- backward, dX   [B, out] x [out, in]     2*B*in*out (needed for every layer: the embedding
                                          table is trained, so even the first layer's input
                                          gradient is computed)
- backward, dW   [out, B] x [B, in]       2*B*in*out

so training costs 3 x forward = 6*in*out FLOPs per Linear per sample. Embedding gathers, bias
adds, ReLU, the loss and the optimizer steps are ignored here: the limit is what the matrix
multiplies alone allow, ``limit_samples_per_s = measured_flops / flops_per_sample``, an upper
bound no implementation of this model on this machine can beat in float32. Every shape is timed
with ``torch.matmul`` (median of repeats after a warm-up) and the step's multiplies are summed.
The fused variant (both towers' first layers as one [414, 400] multiply, same FLOPs), a large
square multiply (the machine's practical peak) and the step's shapes in bfloat16 (this CPU has
AVX512-BF16) are timed for comparison. If
benchmarks/results/train_throughput.json exists, the measured training rate is read as a
fraction of the limit.
"""

from __future__ import annotations

import itertools
import json
import time

import torch
from _common import RESULTS_DIR, median, parser, print_table, write_result

NAME = "machine_limit"
BATCH = 1024
INPUT = 23 * 18
TOWER = (INPUT, 200, 80, 1)


def step_shapes(layers: tuple[int, ...], towers: int) -> list[tuple[str, int, int, int, int]]:
    """(label, M, K, N, count per step) of every multiply of one training step."""
    shapes = []
    for a, b in itertools.pairwise(layers):
        shapes += [
            (f"fwd {a}->{b}: [{BATCH},{a}]x[{a},{b}]", BATCH, a, b, towers),
            (f"dX  {a}->{b}: [{BATCH},{b}]x[{b},{a}]", BATCH, b, a, towers),
            (f"dW  {a}->{b}: [{b},{BATCH}]x[{BATCH},{a}]", b, BATCH, a, towers),
        ]
    return shapes


def time_matmul(
    m: int, k: int, n: int, min_seconds: float, repeats: int, dtype: torch.dtype = torch.float32
) -> float:
    """Median seconds of one [m,k]x[k,n] torch.matmul (float32 unless ``dtype`` says)."""
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    out = torch.empty(m, n, dtype=dtype)
    for _ in range(3):
        torch.matmul(a, b, out=out)
    calls = 1
    while True:  # calibrate calls so one repeat lasts min_seconds
        start = time.perf_counter()
        for _ in range(calls):
            torch.matmul(a, b, out=out)
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            break
        calls = max(calls * 2, int(calls * min_seconds / max(elapsed, 1e-9)))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            torch.matmul(a, b, out=out)
        samples.append((time.perf_counter() - start) / calls)
    return median(samples)


def flops_per_sample(layers: tuple[int, ...], towers: int) -> dict:
    forward = towers * sum(2 * a * b for a, b in itertools.pairwise(layers))
    return {"forward": forward, "backward": 2 * forward, "training": 3 * forward}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--repeats", type=int, default=7, help="timed repeats per shape")
    p.add_argument("--min-seconds", type=float, default=0.05, help="seconds per repeat")
    args = p.parse_args()
    if args.quick:
        args.repeats, args.min_seconds = 3, 0.005

    rows, shape_records, step_seconds, step_flops = [], [], 0.0, 0
    for label, m, k, n, count in step_shapes(TOWER, towers=2):
        seconds = time_matmul(m, k, n, args.min_seconds, args.repeats)
        flops = 2 * m * k * n
        step_seconds += seconds * count
        step_flops += flops * count
        rows.append([label, count, seconds * 1e6, flops / seconds / 1e9])
        shape_records.append(
            {"shape": label, "m": m, "k": k, "n": n, "per_step": count, "seconds": seconds}
        )
    print_table(
        ["multiply", "per step", "us each", "GFLOP/s"],
        rows,
        f"float32 torch.matmul, {torch.get_num_threads()} threads",
    )

    fps = flops_per_sample(TOWER, towers=2)
    assert fps["training"] * BATCH == step_flops, "shape list and FLOP formula disagree"
    measured_flops = step_flops / step_seconds
    limit = measured_flops / fps["training"]

    # fused first layers: one [B,414]x[414,400] instead of two [B,414]x[414,200]
    fused_seconds = step_seconds
    for label, *_, count in step_shapes(TOWER[:2], towers=2):
        fused_seconds -= count * next(r["seconds"] for r in shape_records if r["shape"] == label)
    fused_first = step_shapes((INPUT, 400), towers=1)
    for _, m, k, n, count in fused_first:
        fused_seconds += count * time_matmul(m, k, n, args.min_seconds, args.repeats)
    fused_limit = BATCH / fused_seconds

    bf16_seconds = sum(
        count * time_matmul(m, k, n, args.min_seconds, args.repeats, torch.bfloat16)
        for _, m, k, n, count in step_shapes(TOWER, towers=2)
    )
    bf16_limit = BATCH / bf16_seconds

    square = 256 if args.quick else 2048
    square_seconds = time_matmul(square, square, square, args.min_seconds, args.repeats)
    peak = 2 * square**3 / square_seconds

    summary = [
        ["training FLOPs per sample (fwd + bwd, matmuls only)", fps["training"]],
        ["measured FLOP/s on the step's shapes (GFLOP/s)", measured_flops / 1e9],
        ["limit: samples/s (matmuls alone)", limit],
        ["limit with the two first layers fused (samples/s)", fused_limit],
        [f"large square matmul {square}^3 (GFLOP/s)", peak / 1e9],
        ["same shapes in bfloat16: limit (samples/s), for reference", bf16_limit],
    ]
    ours = None
    train_json = RESULTS_DIR / "train_throughput.json"
    if train_json.exists():
        tables = json.loads(train_json.read_text())["tables"]
        ours = {k: t["ours"]["samples_per_s"] for k, t in tables.items()}
        for kind, rate in ours.items():
            summary.append([f"ours, {kind} table (samples/s) / limit", rate / limit])
    print_table(["quantity", "value"], summary, "Limit")

    write_result(
        NAME,
        args,
        {
            "batch_size": BATCH,
            "tower_layers": list(TOWER),
            "towers": 2,
            "flops_per_sample": fps,
            "shapes": shape_records,
            "step_matmul_seconds": step_seconds,
            "measured_flops_per_s": measured_flops,
            "limit_samples_per_s": limit,
            "fused_first_layer_limit_samples_per_s": fused_limit,
            "square_matmul": {"size": square, "flops_per_s": peak},
            "bfloat16_limit_samples_per_s": bf16_limit,
            "ours_samples_per_s": ours,
            "ours_over_limit": None if ours is None else {k: v / limit for k, v in ours.items()},
            "note": "embedding gathers, bias, ReLU, loss and optimizer steps are not counted",
        },
    )


if __name__ == "__main__":
    main()
