"""Scoring throughput: ``esmm.train.predict`` (pCTR and pCVR of every row) in batches of 8192.

The model and table are train_throughput.py's small-vocabulary case (23 single-id fields with
1,000 ids each, embedding 18, towers 200-80); the weights are freshly initialised, which does not
change the work. The figure is rows / seconds of one ``predict`` call over the whole encoded
table (contiguous slices, eval mode, no autograd), the median of several calls after a warm-up.
For context the forward pass's matrix multiplies are timed alone at the same batch size:
``forward limit`` is what they allow, an upper bound for any float32 implementation here. A
prototype (not the library) scores the same rows under ``torch.autocast("cpu", bfloat16)`` and
reports its speed and how far its probabilities are from the float32 ones.
"""

from __future__ import annotations

import itertools
import time

import torch
from _common import median, parser, print_table, verdict, write_result
from machine_limit import TOWER, time_matmul
from torch import nn
from train_throughput import make_table, model_settings, schema

from esmm.data.encode import EncodedFeatures, FeatureEncoder
from esmm.models import build_model
from esmm.models.esmm import TwoTowerOutput
from esmm.train import predict

NAME = "score_throughput"
TARGET = 500_000


class Bfloat16Scoring(nn.Module):
    """Prototype: the model's forward under bfloat16 autocast, logits back in float32."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, features: EncodedFeatures) -> TwoTowerOutput:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            output = self.model(features)
        return TwoTowerOutput(output.ctr_logit.float(), output.cvr_logit.float())


def profile_predict(model: nn.Module, features: EncodedFeatures, batch: int) -> list[dict]:
    """torch.profiler self-CPU time of the top operators in one predict call."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        predict(model, features, batch)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return [
        {"op": e.key, "calls": e.count, "share": e.self_cpu_time_total / total} for e in events[:8]
    ]


def forward_limit(batch: int, min_seconds: float, repeats: int) -> float:
    """Samples/s the two towers' forward multiplies allow at ``batch`` rows per call."""
    seconds = sum(
        2 * time_matmul(batch, a, b, min_seconds, repeats) for a, b in itertools.pairwise(TOWER)
    )
    return batch / seconds


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--rows", type=int, default=1_000_000, help="rows scored per call")
    p.add_argument("--batch-size", type=int, default=8192, help="predict's batch size")
    p.add_argument("--repeats", type=int, default=5, help="timed predict calls")
    args = p.parse_args()
    if args.quick:
        args.rows, args.repeats = 50_000, 2

    table = make_table(args.rows, 0, seed=3)
    encoder = FeatureEncoder.fit(table, schema(), min_count=1)
    features = encoder.transform(table)
    torch.manual_seed(0)
    model = build_model(model_settings(), encoder)

    predict(model, features.slice(0, min(len(features), 100_000)), args.batch_size)  # warm-up
    results = {}
    for batch in dict.fromkeys([args.batch_size, 65536]):  # 65536: the trainer's eval batch
        seconds = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            pctr, pcvr = predict(model, features, batch)
            seconds.append(time.perf_counter() - start)
        assert pctr is not None and pcvr is not None and len(pcvr) == args.rows
        if batch == args.batch_size:
            pctr32, pcvr32 = pctr, pcvr
        results[batch] = {
            "samples_per_s": args.rows / median(seconds),
            "seconds": seconds,
            "forward_limit_samples_per_s": forward_limit(
                batch, 0.005 if args.quick else 0.05, 3 if args.quick else 5
            ),
        }

    # prototype, not the library: the same predict under bfloat16 autocast (this CPU has
    # AVX512-BF16, whose matrix multiplies run several times faster than float32 ones)
    seconds = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        bf_pctr, bf_pcvr = predict(Bfloat16Scoring(model), features, args.batch_size)
        seconds.append(time.perf_counter() - start)
    bf16 = {
        "samples_per_s": args.rows / median(seconds),
        "seconds": seconds,
        "max_abs_pcvr_difference": float(abs(bf_pcvr - pcvr32).max()),
        "mean_abs_pcvr_difference": float(abs(bf_pcvr - pcvr32).mean()),
        "max_abs_pctr_difference": float(abs(bf_pctr - pctr32).max()),
    }

    where = profile_predict(model, features.slice(0, min(len(features), 200_000)), args.batch_size)
    main_rate = results[args.batch_size]["samples_per_s"]
    print_table(
        ["batch", "rows", "samples/s", "forward matmul limit", "share of limit"],
        [
            [
                b,
                args.rows,
                r["samples_per_s"],
                r["forward_limit_samples_per_s"],
                r["samples_per_s"] / r["forward_limit_samples_per_s"],
            ]
            for b, r in results.items()
        ],
        f"Scoring with esmm.train.predict ({torch.get_num_threads()} threads)",
    )
    print_table(
        ["variant", "samples/s", "max |pCVR diff|", "mean |pCVR diff|", "max |pCTR diff|"],
        [
            [
                f"predict under bfloat16 autocast, batch {args.batch_size}",
                bf16["samples_per_s"],
                bf16["max_abs_pcvr_difference"],
                bf16["mean_abs_pcvr_difference"],
                bf16["max_abs_pctr_difference"],
            ]
        ],
        "Prototype (not the library): bfloat16 towers, difference to float32 scores",
    )
    print_table(
        ["op", "calls", "share of self CPU time"],
        [[e["op"], e["calls"], e["share"]] for e in where],
        "torch.profiler, one predict call over 200,000 rows",
    )
    print_table(
        ["target", "measured", "goal", "verdict"],
        [
            [
                f"scoring, batch {args.batch_size} (samples/s)",
                main_rate,
                TARGET,
                verdict(main_rate, TARGET),
            ]
        ],
        "Target",
    )
    write_result(
        NAME,
        args,
        {
            "rows": args.rows,
            "batch_size": args.batch_size,
            "samples_per_s": main_rate,
            "by_batch_size": {str(b): r for b, r in results.items()},
            "prototype_bf16_autocast": bf16,
            "profile": where,
            "targets": [
                {
                    "name": f"scoring, batch {args.batch_size} (samples/s)",
                    "measured": main_rate,
                    "target": TARGET,
                    "met": main_rate >= TARGET,
                }
            ],
        },
    )


if __name__ == "__main__":
    main()
