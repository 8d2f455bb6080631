"""Training throughput of ESMM with the paper's architecture, against a plain PyTorch loop.

The model: 23 single-id fields, embedding 18 (tower input 414), towers 200-80, batch 1024,
Adam(0.9, 0.999, 1e-8) - in our trainer SparseAdam for the shared sparse embedding table and Adam
for the towers. Two tables are built directly with pyarrow (not the simulator):

- small: every field has 1,000 ids;
- big: the same, but the item field ``205`` has 1,000,000 distinct ids, every one of which
  occurs in the table (the vocabulary after ``FeatureEncoder.fit(min_count=1)`` is reported).

Ours is ``esmm.train.train_model`` itself (progress bar off): steady-state samples/s is the
median of ``EpochResult.samples_per_second`` over the measured epochs, after a warm-up run.
"ours + proposed optimizers" is the same train_model with ``esmm.train.build_optimizers``
replaced by the prototype in benchmarks/_prototypes.py (LazyAdam + fused Adam), to measure a
library change before making it.

The plain loop is ESMM written the usual way: a ``Dataset`` whose ``__getitem__`` returns one
row as a dict of tensors, one per field plus the labels (as torch-rechub's datasets do), a
``DataLoader(batch_size=1024, shuffle=True)`` collating rows (no worker processes: the two cores
are the whole budget), one dense-gradient ``nn.Embedding`` per field, the same towers, BCE on
probabilities and one ``torch.optim.Adam`` over all parameters. "plain, packed row" is a kinder
variant whose row is one [23] id tensor plus the labels (fewer tensors to collate).

Each table runs in its own child process so that resident-memory figures (RSS from
/proc/self/status, peak reset with clear_refs) belong to that table alone. A per-phase time
breakdown of our step (batch gather, forward, loss, backward, the two optimizer steps) is timed
on an instrumented copy of the trainer's step (the same calls as ``esmm.train._run_epoch``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from _common import (
    median,
    parser,
    peak_rss_bytes,
    print_table,
    reset_peak_rss,
    rss_bytes,
    verdict,
    write_result,
)
from _prototypes import proposed_build_optimizers
from torch import nn
from torch.utils.data import DataLoader, Dataset

import esmm.train
from esmm.config import TrainSettings
from esmm.data.aliccp import ALICCP_FIELDS
from esmm.data.encode import EncodedSplit, FeatureEncoder
from esmm.data.table import FieldKind, TableSchema
from esmm.models import build_model
from esmm.train import build_optimizers, train_model

NAME = "train_throughput"
EMBEDDING_DIM = 18
TOWER_DIMS = (200, 80)
BATCH = 1024
SMALL_VOCAB = 1_000
BIG_FIELD = "205"  # Ali-CCP's item id field
ALICCP_TRAIN_ROWS = 42_300_135  # the full Ali-CCP training file
WORKER_FLAGS = (
    "small_rows",
    "big_rows",
    "big_vocab",
    "epochs",
    "big_epochs",
    "baseline_batches",
    "breakdown_steps",
    "profile_steps",
)
TARGETS = {
    "ours_small_samples_per_s": 70_000,
    "big_over_small": 0.70,
    "ours_over_baseline": 3.0,
}
OptimizerBuilder = Callable[[nn.Module, TrainSettings], list[torch.optim.Optimizer]]


# --------------------------------------------------------------------------- data


def make_table(n_rows: int, big_vocab: int, seed: int) -> pa.Table:
    """23 single-id int64 fields with ~1k ids each; with ``big_vocab`` > 0 the item field has
    exactly ``big_vocab`` distinct ids, each present at least once (the rest drawn uniformly)."""
    rng = np.random.default_rng(seed)
    columns: dict[str, np.ndarray] = {}
    for name in ALICCP_FIELDS:
        if name == BIG_FIELD and big_vocab:
            if n_rows < big_vocab:
                raise ValueError(f"need at least {big_vocab:,} rows for a {big_vocab:,}-id field")
            extra = rng.integers(0, big_vocab, n_rows - big_vocab)
            columns[name] = rng.permutation(np.concatenate([np.arange(big_vocab), extra]))
        else:
            columns[name] = rng.integers(0, SMALL_VOCAB, n_rows)
    click = rng.random(n_rows) < 0.04
    conversion = click & (rng.random(n_rows) < 0.1)
    return pa.table(
        {
            "click": click.astype(np.int8),
            "conversion": conversion.astype(np.int8),
            **{name: pa.array(values, pa.int64()) for name, values in columns.items()},
        }
    )


def schema() -> TableSchema:
    return TableSchema.of({name: FieldKind.SINGLE for name in ALICCP_FIELDS})


def split_bytes(split: EncodedSplit) -> int:
    f = split.features
    tensors = [f.single_ids, f.dense, *f.multi_values, *f.multi_offsets]
    return sum(t.numel() * t.element_size() for t in [*tensors, split.click, split.conversion])


def model_settings() -> dict:
    return {"kind": "esmm", "embedding_dim": EMBEDDING_DIM, "tower_dims": list(TOWER_DIMS)}


# --------------------------------------------------------------------------- ours


def run_ours(
    encoder: FeatureEncoder,
    train: EncodedSplit,
    val: EncodedSplit,
    epochs: int,
    warmup_rows: int,
    optimizers: OptimizerBuilder,
) -> dict:
    """train_model for ``epochs`` epochs after a short warm-up run; samples/s per epoch.
    ``optimizers`` stands in for esmm.train.build_optimizers during the call."""
    library_builder = esmm.train.build_optimizers
    esmm.train.build_optimizers = optimizers
    try:
        warm = EncodedSplit(
            train.features.slice(0, warmup_rows),
            train.click[:warmup_rows],
            train.conversion[:warmup_rows],
        )
        settings = TrainSettings(batch_size=BATCH, epochs=1, monitor="val_loss", patience=1)
        torch.manual_seed(0)
        model = build_model(model_settings(), encoder)
        train_model(model, warm, val, settings, seed=1, progress=False)

        settings = TrainSettings(
            batch_size=BATCH, epochs=epochs, monitor="val_loss", patience=epochs
        )
        torch.manual_seed(0)
        model = build_model(model_settings(), encoder)
        before = rss_bytes()
        reset_peak_rss()
        result = train_model(model, train, val, settings, seed=0, progress=False)
        peak = peak_rss_bytes()
    finally:
        esmm.train.build_optimizers = library_builder
    rates = [h.samples_per_second for h in result.history]
    return {
        "samples_per_s": median(rates),
        "epoch_samples_per_s": rates,
        "epoch_seconds": [h.seconds for h in result.history],
        "train_loss": [h.train_loss for h in result.history],
        "rss_before_train_bytes": before,
        "peak_rss_during_train_bytes": peak,
    }


PHASES = ("take", "forward", "loss", "zero_grad", "backward", "embedding_step", "tower_step")


def breakdown(
    encoder: FeatureEncoder, train: EncodedSplit, steps: int, optimizers: OptimizerBuilder
) -> dict:
    """Median seconds per step of each phase of the trainer's step (train._run_epoch's calls)."""
    torch.manual_seed(0)
    model = build_model(model_settings(), encoder)
    embedding_opt, tower_opt = optimizers(model, TrainSettings())
    model.train()
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {p: [] for p in PHASES}
    for step in range(steps + 5):
        t = [time.perf_counter()]
        batch = order[step * BATCH : (step + 1) * BATCH]
        features = train.features.take(batch)
        click, conversion = train.click[batch], train.conversion[batch]
        t.append(time.perf_counter())
        output = model(features)
        t.append(time.perf_counter())
        loss, _ = model.loss(output, click, conversion)
        torch.isfinite(loss).item()
        t.append(time.perf_counter())
        embedding_opt.zero_grad(set_to_none=True)
        tower_opt.zero_grad(set_to_none=True)
        t.append(time.perf_counter())
        loss.backward()
        t.append(time.perf_counter())
        embedding_opt.step()
        t.append(time.perf_counter())
        tower_opt.step()
        t.append(time.perf_counter())
        if step >= 5:  # warm-up steps are not counted
            for i, phase in enumerate(PHASES):
                times[phase].append(t[i + 1] - t[i])
    return {p: median(v) for p, v in times.items()}


def equivalence(encoder: FeatureEncoder, train: EncodedSplit, steps: int) -> dict:
    """Largest weight difference after ``steps`` identical steps with the library's optimizers
    and the proposed ones (same start, same batches): the proposal must not change training."""
    models = []
    for builder in (build_optimizers, proposed_build_optimizers):
        torch.manual_seed(0)
        model = build_model(model_settings(), encoder)
        opts = builder(model, TrainSettings())
        for step in range(steps):
            batch = torch.arange(step * BATCH, (step + 1) * BATCH) % len(train)
            output = model(train.features.take(batch))
            loss, _ = model.loss(output, train.click[batch], train.conversion[batch])
            for opt in opts:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            for opt in opts:
                opt.step()
        models.append(model.state_dict())
    diffs = {k: float((models[0][k] - models[1][k]).abs().max()) for k in models[0]}
    return {"steps": steps, "max_abs_weight_difference": max(diffs.values())}


def profile(encoder: FeatureEncoder, train: EncodedSplit, steps: int, top: int = 15) -> list[dict]:
    """torch.profiler self-CPU time of the most expensive operators over ``steps`` steps of the
    library's trainer step."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    torch.manual_seed(0)
    model = build_model(model_settings(), encoder)
    optimizers = build_optimizers(model, TrainSettings())
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))

    def step(i: int) -> None:
        batch = order[i * BATCH : (i + 1) * BATCH]
        output = model(train.features.take(batch))
        loss, _ = model.loss(output, train.click[batch], train.conversion[batch])
        torch.isfinite(loss).item()
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()

    for i in range(5):
        step(i)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(5, 5 + steps):
            step(i)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return [
        {
            "op": e.key,
            "calls_per_step": e.count / steps,
            "self_ms_per_step": e.self_cpu_time_total / steps / 1000,
            "share": e.self_cpu_time_total / total,
        }
        for e in events[:top]
    ]


# --------------------------------------------------------------------------- plain loop


class FieldRowDataset(Dataset):
    """One impression per item as a dict of tensors, one per field plus the labels."""

    def __init__(self, ids: torch.Tensor, names: list[str], click: torch.Tensor, conv) -> None:
        self.columns = {name: ids[:, j].contiguous() for j, name in enumerate(names)}
        self.click, self.conversion = click, conv

    def __len__(self) -> int:
        return self.click.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = {name: column[i] for name, column in self.columns.items()}
        row["click"], row["conversion"] = self.click[i], self.conversion[i]
        return row


class PackedRowDataset(Dataset):
    """One impression per item as {"ids": [23] tensor, "click", "conversion"}."""

    def __init__(self, ids: torch.Tensor, click: torch.Tensor, conv: torch.Tensor) -> None:
        self.ids, self.click, self.conversion = ids, click, conv

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"ids": self.ids[i], "click": self.click[i], "conversion": self.conversion[i]}


class PlainESMM(nn.Module):
    """ESMM written the usual way: an nn.Embedding per field, two MLP towers, probabilities."""

    def __init__(self, names: list[str], cardinalities: list[int], dim: int, towers) -> None:
        super().__init__()
        self.names = names
        self.embeddings = nn.ModuleList(nn.Embedding(c, dim) for c in cardinalities)

        def mlp() -> nn.Sequential:
            layers: list[nn.Module] = []
            width = dim * len(cardinalities)
            for out in towers:
                layers += [nn.Linear(width, out), nn.ReLU()]
                width = out
            return nn.Sequential(*layers, nn.Linear(width, 1))

        self.ctr, self.cvr = mlp(), mlp()

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if "ids" in batch:
            parts = [emb(batch["ids"][:, j]) for j, emb in enumerate(self.embeddings)]
        else:
            parts = [emb(batch[n]) for n, emb in zip(self.names, self.embeddings, strict=True)]
        x = torch.cat(parts, dim=1)
        return torch.sigmoid(self.ctr(x)).squeeze(-1), torch.sigmoid(self.cvr(x)).squeeze(-1)


def run_plain(
    encoder: FeatureEncoder, train: EncodedSplit, packed: bool, batches: int, repeats: int
) -> dict:
    """Samples/s of the plain loop: median over ``repeats`` segments of ``batches`` steps."""
    names = encoder.schema.names(FieldKind.SINGLE)
    cards = [encoder.cardinalities[n] for n in names]
    torch.manual_seed(0)
    model = PlainESMM(names, cards, EMBEDDING_DIM, TOWER_DIMS)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
    ids = train.features.single_ids.to(torch.int64)
    dataset = (
        PackedRowDataset(ids, train.click, train.conversion)
        if packed
        else FieldRowDataset(ids, names, train.click, train.conversion)
    )
    batch_iter = iter(DataLoader(dataset, batch_size=BATCH, shuffle=True))

    def steps(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            batch = next(batch_iter)
            pctr, pcvr = model(batch)
            click = batch["click"]
            loss = F.binary_cross_entropy(pctr, click) + F.binary_cross_entropy(
                pctr * pcvr, click * batch["conversion"]
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return time.perf_counter() - start

    steps(3)  # warm-up
    rates = [batches * BATCH / steps(batches) for _ in range(repeats)]
    return {"samples_per_s": median(rates), "segment_samples_per_s": rates, "batches": batches}


# --------------------------------------------------------------------------- one table


def run_table(kind: str, args: argparse.Namespace) -> dict:
    """Everything measured on one table, in this (child) process."""
    if args.quick:
        rows, big_vocab, epochs = (60_000, 0, 2) if kind == "small" else (120_000, 50_000, 1)
    elif kind == "small":
        rows, big_vocab, epochs = args.small_rows, 0, args.epochs
    else:
        rows, big_vocab, epochs = args.big_rows, args.big_vocab, args.big_epochs
    steps = 10 if args.quick else args.breakdown_steps
    plain_batches = 3 if args.quick else args.baseline_batches

    def log(text: str) -> None:
        print(f"[{kind}] {text}", file=sys.stderr, flush=True)

    rss_start = rss_bytes()
    table = make_table(rows, big_vocab, seed=1)
    val_table = make_table(max(rows // 50, 5_000), 0, seed=2)
    rss_table = rss_bytes()
    encoder = FeatureEncoder.fit(table, schema(), min_count=1)
    cards = encoder.cardinalities
    rss_fit = rss_bytes()
    reset_peak_rss()
    train = encoder.encode_split(table)
    val = encoder.encode_split(val_table)
    rss_encoded = rss_bytes()
    peak_encode = peak_rss_bytes()
    log(
        f"{rows:,} rows; vocabulary of {BIG_FIELD}: {cards[BIG_FIELD] - 1:,}; "
        f"embedding rows: {sum(cards.values()):,}"
    )
    warmup_rows = min(50_000, rows // 2)
    ours = run_ours(encoder, train, val, epochs, warmup_rows, build_optimizers)
    log(f"ours: {ours['samples_per_s']:,.0f} samples/s")
    proposed = run_ours(encoder, train, val, epochs, warmup_rows, proposed_build_optimizers)
    log(f"ours + proposed optimizers: {proposed['samples_per_s']:,.0f} samples/s")
    phases = {
        "library": breakdown(encoder, train, steps, build_optimizers),
        "proposed": breakdown(encoder, train, steps, proposed_build_optimizers),
    }
    same = equivalence(encoder, train, steps=5 if args.quick else 20)
    plain = run_plain(encoder, train, packed=False, batches=plain_batches, repeats=3)
    log(f"plain loop: {plain['samples_per_s']:,.0f} samples/s")
    packed = run_plain(encoder, train, packed=True, batches=plain_batches, repeats=3)
    log(f"plain loop, packed row: {packed['samples_per_s']:,.0f} samples/s")
    out = {
        "table": kind,
        "rows": rows,
        "fields": len(ALICCP_FIELDS),
        "vocabulary_of_big_field": cards[BIG_FIELD] - 1,
        "embedding_rows": sum(cards.values()),
        "epochs_measured": epochs,
        "ours": ours,
        "ours_proposed": proposed,
        "plain": plain,
        "plain_packed": packed,
        "ratio": ours["samples_per_s"] / plain["samples_per_s"],
        "ratio_packed": ours["samples_per_s"] / packed["samples_per_s"],
        "ratio_proposed": proposed["samples_per_s"] / plain["samples_per_s"],
        "breakdown_seconds_per_step": phases,
        "proposed_equivalence": same,
        "memory": {
            "arrow_table_bytes_per_row": table.nbytes / rows,
            "encoded_split_bytes_per_row": split_bytes(train) / rows,
            "rss_table_delta_per_row": (rss_table - rss_start) / rows,
            "rss_encode_delta_per_row": (rss_encoded - rss_fit) / rows,
            "peak_rss_encode_delta_per_row": (peak_encode - rss_fit) / rows,
            "peak_rss_train_over_before_train_bytes": ours["peak_rss_during_train_bytes"]
            - ours["rss_before_train_bytes"],
            "peak_rss_train_bytes": ours["peak_rss_during_train_bytes"],
            "rss_start_bytes": rss_start,
        },
    }
    if args.profile_steps:
        out["profile"] = profile(encoder, train, args.profile_steps)
    return out


# --------------------------------------------------------------------------- driver


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--small-rows", type=int, default=1_000_000, help="rows of the small table")
    p.add_argument("--big-rows", type=int, default=2_000_000, help="rows of the big table")
    p.add_argument("--big-vocab", type=int, default=1_000_000, help="ids of the big item field")
    p.add_argument("--epochs", type=int, default=3, help="measured epochs on the small table")
    p.add_argument("--big-epochs", type=int, default=2, help="measured epochs on the big table")
    p.add_argument("--baseline-batches", type=int, default=30, help="plain-loop steps per repeat")
    p.add_argument("--breakdown-steps", type=int, default=100, help="steps of the phase timing")
    p.add_argument("--profile-steps", type=int, default=30, help="torch.profiler steps (0: off)")
    p.add_argument("--tables", default="small,big", help="comma-separated: small, big")
    p.add_argument("--worker", choices=["small", "big"], help=argparse.SUPPRESS)
    p.add_argument("--worker-output", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:
        args.worker_output.write_text(json.dumps(run_table(args.worker, args)))
        return

    tables = {}
    for kind in args.tables.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "table.json"
            cmd = [sys.executable, __file__, "--worker", kind, "--worker-output", str(out)]
            cmd += ["--quick"] if args.quick else []
            for flag in WORKER_FLAGS:
                cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
            subprocess.run(cmd, check=True)
            tables[kind] = json.loads(out.read_text())
    report(tables, args)


def target_rows(tables: dict) -> list[list]:
    small, big = tables.get("small"), tables.get("big")
    rows = []
    if small:
        goal = TARGETS["ours_small_samples_per_s"]
        rows.append(["ours, small vocabularies (samples/s)", small["ours"]["samples_per_s"], goal])
        rows.append(["ours / plain loop, small", small["ratio"], TARGETS["ours_over_baseline"]])
    if big:
        rows.append(["ours / plain loop, million-id", big["ratio"], TARGETS["ours_over_baseline"]])
    if small and big:
        ratio = big["ours"]["samples_per_s"] / small["ours"]["samples_per_s"]
        rows.append(["million-id / small (ours)", ratio, TARGETS["big_over_small"]])
    return rows


def report(tables: dict, args: argparse.Namespace) -> None:
    print_table(
        [
            "table",
            "rows",
            f"ids in {BIG_FIELD}",
            "ours",
            "ours+proposed",
            "plain",
            "plain packed",
            "ours/plain",
            "ours/packed",
        ],
        [
            [
                kind,
                t["rows"],
                t["vocabulary_of_big_field"],
                t["ours"]["samples_per_s"],
                t["ours_proposed"]["samples_per_s"],
                t["plain"]["samples_per_s"],
                t["plain_packed"]["samples_per_s"],
                t["ratio"],
                t["ratio_packed"],
            ]
            for kind, t in tables.items()
        ],
        "Training samples/s (23 single-id fields, embedding 18, towers 200-80, batch 1024)",
    )
    targets = target_rows(tables)
    print_table(
        ["target", "measured", "goal", "verdict"],
        [[n, m, g, verdict(m, g)] for n, m, g in targets],
        "Targets (library as is)",
    )

    headers, columns = ["phase"], []
    for kind, t in tables.items():
        for variant, phases in t["breakdown_seconds_per_step"].items():
            headers.append(f"{kind} {variant} ms")
            columns.append(phases)
    bd_rows = [[phase, *(c[phase] * 1000 for c in columns)] for phase in PHASES]
    bd_rows.append(["total", *(sum(c.values()) * 1000 for c in columns)])
    bd_rows.append(["=> samples/s", *(BATCH / sum(c.values()) for c in columns)])
    print_table(headers, bd_rows, "Where a training step's time goes (median ms per step)")
    for kind, t in tables.items():
        diff = t["proposed_equivalence"]["max_abs_weight_difference"]
        print(
            f"{kind}: proposed optimizers vs library, max weight difference after "
            f"{t['proposed_equivalence']['steps']} steps: {diff:.2e}"
        )

    mem_rows = []
    for kind, t in tables.items():
        m = t["memory"]
        per_row = m["arrow_table_bytes_per_row"] + m["encoded_split_bytes_per_row"] + 8
        fixed = m["peak_rss_train_over_before_train_bytes"]
        m["projected_bytes_for_full_aliccp_train"] = per_row * ALICCP_TRAIN_ROWS + fixed
        mem_rows.append(
            [
                kind,
                m["arrow_table_bytes_per_row"],
                m["encoded_split_bytes_per_row"],
                m["rss_encode_delta_per_row"],
                fixed / 2**20,
                m["projected_bytes_for_full_aliccp_train"] / 2**30,
            ]
        )
    print_table(
        [
            "table",
            "Arrow B/row",
            "encoded B/row",
            "RSS growth, encode B/row",
            "train peak MiB",
            f"GiB at {ALICCP_TRAIN_ROWS / 1e6:.1f}M rows",
        ],
        mem_rows,
        "Memory (projection: (Arrow + encoded + 8 B permutation) x rows + training peak over "
        "the RSS before training)",
    )
    for kind, t in tables.items():
        if "profile" in t:
            print_table(
                ["op", "calls/step", "self ms/step", "share"],
                [
                    [e["op"], e["calls_per_step"], e["self_ms_per_step"], e["share"]]
                    for e in t["profile"]
                ],
                f"torch.profiler, {kind} table: top operators by self CPU time",
            )

    write_result(
        NAME,
        args,
        {
            "settings": {
                "fields": len(ALICCP_FIELDS),
                "embedding_dim": EMBEDDING_DIM,
                "tower_dims": list(TOWER_DIMS),
                "batch_size": BATCH,
                "small_vocab": SMALL_VOCAB,
                "big_field": BIG_FIELD,
                "threads": torch.get_num_threads(),
            },
            "targets": [
                {"name": n, "measured": m, "target": g, "met": m >= g} for n, m, g in targets
            ],
            "tables": tables,
        },
    )


if __name__ == "__main__":
    main()
