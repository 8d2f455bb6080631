"""Scoring throughput: ``esmm.train.predict`` (pCTR and pCVR of every row) in batches of 8192,
in float32 (the default) and in bfloat16 (``precision="bfloat16"``, opt-in for scoring).

The model and table are train_throughput.py's small-vocabulary case (23 single-id fields with
1,000 ids each, embedding 18, towers 200-80). Labels are drawn from per-id effects, so the model
has something to learn: it is trained for one epoch on a separate table before scoring, and the
two precisions are compared on these trained weights (largest and mean difference of pCVR and
pCTR, and the AUCs of each). The speed is rows / seconds of one ``predict`` call over the whole
encoded table (contiguous slices, eval mode, no autograd), the median of several calls after a
warm-up. For context the forward pass's matrix multiplies are timed alone at the same batch
size and precision: ``forward limit`` is what they allow, an upper bound for that precision.
"""

from __future__ import annotations

import itertools
import time

import numpy as np
import pyarrow as pa
import torch
from _common import median, parser, print_table, verdict, write_result
from machine_limit import TOWER, time_matmul
from torch import nn
from train_throughput import SMALL_VOCAB, make_table, model_settings, schema

from esmm.config import TrainSettings
from esmm.data.aliccp import ALICCP_FIELDS
from esmm.data.encode import EncodedFeatures, FeatureEncoder
from esmm.metrics import evaluate_predictions
from esmm.models import build_model
from esmm.train import bfloat16_matmul_supported, predict, train_model

NAME = "score_throughput"
TARGET = 500_000
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
AUCS = ("ctr_auc", "cvr_auc_clicked", "ctcvr_auc")


def with_learnable_labels(table: pa.Table, seed: int) -> pa.Table:
    """``table`` with click and conversion drawn from per-(field, id) effects that are the
    same for every table (effects from seed 11), so a trained model ranks better than chance
    and the precisions' AUCs can be compared."""
    effects = np.random.default_rng(11).normal(0.0, 0.25, (2, len(ALICCP_FIELDS), SMALL_VOCAB))
    logits = np.array([-3.2, -2.2])[:, None] + sum(
        effects[:, f, table[name].to_numpy()] for f, name in enumerate(ALICCP_FIELDS)
    )
    rng = np.random.default_rng(seed)
    click = rng.random(table.num_rows) < 1 / (1 + np.exp(-logits[0]))
    conversion = click & (rng.random(table.num_rows) < 1 / (1 + np.exp(-logits[1])))
    table = table.set_column(0, "click", pa.array(click.astype(np.int8)))
    return table.set_column(1, "conversion", pa.array(conversion.astype(np.int8)))


def trained_model(encoder: FeatureEncoder, rows: int) -> nn.Module:
    """The benchmark's model after one epoch on ``rows`` fresh labelled rows."""
    train = encoder.encode_split(with_learnable_labels(make_table(rows, 0, seed=5), seed=5))
    val = encoder.encode_split(with_learnable_labels(make_table(20_000, 0, seed=6), seed=6))
    torch.manual_seed(0)
    model = build_model(model_settings(), encoder)
    settings = TrainSettings(batch_size=1024, epochs=1, monitor="val_loss", patience=1)
    train_model(model, train, val, settings, seed=0, progress=False)
    return model


def profile_predict(
    model: nn.Module, features: EncodedFeatures, batch: int, precision: str
) -> list[dict]:
    """torch.profiler self-CPU time of the top operators in one predict call."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        predict(model, features, batch, precision)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return [
        {"op": e.key, "calls": e.count, "share": e.self_cpu_time_total / total} for e in events[:8]
    ]


def forward_limit(batch: int, min_seconds: float, repeats: int, dtype: torch.dtype) -> float:
    """Samples/s the two towers' forward multiplies allow at ``batch`` rows per call."""
    seconds = sum(
        2 * time_matmul(batch, a, b, min_seconds, repeats, dtype)
        for a, b in itertools.pairwise(TOWER)
    )
    return batch / seconds


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--rows", type=int, default=1_000_000, help="rows scored per call")
    p.add_argument("--train-rows", type=int, default=500_000, help="rows of the training epoch")
    p.add_argument("--batch-size", type=int, default=8192, help="predict's batch size")
    p.add_argument("--repeats", type=int, default=5, help="timed predict calls")
    args = p.parse_args()
    if args.quick:
        args.rows, args.train_rows, args.repeats = 50_000, 20_000, 2
    if not bfloat16_matmul_supported():
        raise SystemExit("this CPU has no bfloat16 matrix multiply: nothing to compare")

    table = with_learnable_labels(make_table(args.rows, 0, seed=3), seed=3)
    encoder = FeatureEncoder.fit(table, schema(), min_count=1)
    features = encoder.transform(table)
    model = trained_model(encoder, args.train_rows)
    click, conversion = table["click"].to_numpy(), table["conversion"].to_numpy()

    results: dict[str, dict] = {}
    scores: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for precision, dtype in DTYPES.items():
        warm = features.slice(0, min(len(features), 100_000))
        predict(model, warm, args.batch_size, precision)
        by_batch = {}
        for batch in dict.fromkeys([args.batch_size, 65536]):  # 65536: the trainer's eval batch
            seconds = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                pctr, pcvr = predict(model, features, batch, precision)
                seconds.append(time.perf_counter() - start)
            assert pctr is not None and pcvr is not None and len(pcvr) == args.rows
            if batch == args.batch_size:
                scores[precision] = (pctr, pcvr)
            by_batch[str(batch)] = {
                "samples_per_s": args.rows / median(seconds),
                "seconds": seconds,
                "forward_limit_samples_per_s": forward_limit(
                    batch, 0.005 if args.quick else 0.05, 3 if args.quick else 5, dtype
                ),
            }
        metrics = evaluate_predictions(click, conversion, *scores[precision])
        results[precision] = {
            "samples_per_s": by_batch[str(args.batch_size)]["samples_per_s"],
            "by_batch_size": by_batch,
            "auc": {name: metrics[name] for name in AUCS},
        }

    (pctr32, pcvr32), (pctr16, pcvr16) = scores["float32"], scores["bfloat16"]
    difference = {
        "max_abs_pcvr": float(np.abs(pcvr16 - pcvr32).max()),
        "mean_abs_pcvr": float(np.abs(pcvr16 - pcvr32).mean()),
        "max_abs_pctr": float(np.abs(pctr16 - pctr32).max()),
        "mean_abs_pctr": float(np.abs(pctr16 - pctr32).mean()),
        "auc": {
            name: results["bfloat16"]["auc"][name] - results["float32"]["auc"][name]
            for name in AUCS
        },
    }
    sample = features.slice(0, min(len(features), 200_000))
    profiles = {p: profile_predict(model, sample, args.batch_size, p) for p in DTYPES}

    print_table(
        ["precision", "batch", "rows", "samples/s", "forward matmul limit", "share of limit"],
        [
            [
                precision,
                b,
                args.rows,
                r["samples_per_s"],
                r["forward_limit_samples_per_s"],
                r["samples_per_s"] / r["forward_limit_samples_per_s"],
            ]
            for precision, result in results.items()
            for b, r in result["by_batch_size"].items()
        ],
        f"Scoring with esmm.train.predict, trained weights ({torch.get_num_threads()} threads)",
    )
    print_table(
        ["quantity", "float32", "bfloat16", "bfloat16 - float32"],
        [
            [name, results["float32"]["auc"][name], results["bfloat16"]["auc"][name], diff]
            for name, diff in difference["auc"].items()
        ]
        + [
            [f"{k.replace('_', ' ')} difference", "-", "-", v]
            for k, v in difference.items()
            if k != "auc"
        ],
        "bfloat16 against float32 on the same rows and weights",
    )
    for precision, where in profiles.items():
        print_table(
            ["op", "calls", "share of self CPU time"],
            [[e["op"], e["calls"], e["share"]] for e in where],
            f"torch.profiler, one {precision} predict call over 200,000 rows",
        )
    targets = [
        {
            "name": f"scoring, batch {args.batch_size}, {precision} (samples/s)",
            "measured": results[precision]["samples_per_s"],
            "target": TARGET,
            "met": results[precision]["samples_per_s"] >= TARGET,
        }
        for precision in DTYPES
    ]
    print_table(
        ["target", "measured", "goal", "verdict"],
        [[t["name"], t["measured"], TARGET, verdict(t["measured"], TARGET)] for t in targets],
        "Target",
    )
    write_result(
        NAME,
        args,
        {
            "rows": args.rows,
            "train_rows": args.train_rows,
            "batch_size": args.batch_size,
            "samples_per_s": results["float32"]["samples_per_s"],
            "by_precision": results,
            "bfloat16_difference": difference,
            "profile": profiles,
            "targets": targets,
        },
    )


if __name__ == "__main__":
    main()
