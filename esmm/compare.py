"""`esmm compare`: the paper's model comparison (Ma et al., 2018, Table 2 and Figure 3) as a
command anyone can rerun, plus the measurement the paper could not make on real logs: pCVR
against the true pCVR over the entire impression space (simulated data).

Every model is trained with the same embedding and tower sizes on the same time split, over
several seeds. As in the paper, CTCVR AUC uses pCTR from one independently trained CTR network
per seed, shared by all models (``ctcvr_auc_reference_ctr``); each model's own pCTR, where it
has one, gives ``ctcvr_auc``. AMAN's negative rate and OVERSAMPLING's factor can be searched
over the paper's grids, chosen per seed on the validation days. The sampling-rate figure
retrains every model on a fraction of the training impressions.

Outputs (one folder): ``runs.csv`` (one row per model and seed), ``results.csv`` and
``results.md`` (mean and standard deviation per model), ``bars_<metric>.png`` and
``sampling_rate.png``.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from esmm.atomic import write_text_atomic
from esmm.config import CompareSettings, Config
from esmm.data.encode import EncodedSplit
from esmm.metrics import evaluate_predictions
from esmm.plots import pyplot, save_figure
from esmm.prepare import load_prepared
from esmm.progress import progress_bar
from esmm.train import fit, predict

log = logging.getLogger(__name__)

MODEL_LABELS = {
    "base": "BASE",
    "aman": "AMAN",
    "oversampling": "OVERSAMPLING",
    "unbias": "UNBIAS",
    "division": "DIVISION",
    "esmm_ns": "ESMM-NS",
    "esmm": "ESMM",
    "escm2_ipw": "ESCM2-IPW",
    "escm2_dr": "ESCM2-DR",
}
# The headline columns of results.md, in order: metric -> column title.
REPORTED_METRICS = {
    "cvr_auc_clicked": "CVR AUC (clicked)",
    "ctcvr_auc_reference_ctr": "CTCVR AUC (shared pCTR)",
    "ctcvr_auc": "CTCVR AUC (own pCTR)",
    "ctr_auc": "CTR AUC (own)",
    "cvr_calibration_clicked": "CVR calibration (clicked)",
    "cvr_auc_entire_space": "CVR AUC (entire space)",
    "pcvr_bias_unclicked": "pCVR bias (unclicked)",
    "pcvr_mae_unclicked": "pCVR MAE (unclicked)",
}
PLOTTED_METRICS = ("cvr_auc_clicked", "ctcvr_auc_reference_ctr", "cvr_auc_entire_space")
SEARCHED_PARAMETER = {"aman": "negative_rate", "oversampling": "oversampling_factor"}


@dataclass
class Comparison:
    runs: pd.DataFrame  # one row per model and seed
    summary: pd.DataFrame  # mean and std per model
    sampling: pd.DataFrame  # cvr_auc_clicked per model and training sampling rate
    folder: Path
    seconds: float


def compare_stage(config: Config, settings: CompareSettings, folder: Path) -> Comparison:
    prepared = load_prepared(config)
    encoder = prepared.encoder
    fingerprint = prepared.manifest["fingerprint"]
    train, val, test = (encoder.encode_split(prepared.tables[s]) for s in ("train", "val", "test"))
    search_grid = {
        "aman": [{"negative_rate": r} for r in settings.aman_rates],
        "oversampling": [{"oversampling_factor": k} for k in settings.oversampling_factors],
    }
    trainings = sum(
        1 + len(search_grid[m]) if settings.search and m in search_grid else 1
        for m in settings.models
    )
    rates = [r for r in settings.sampling_rates if r < 1]
    total = len(settings.seeds) * (1 + trainings) + len(rates) * (1 + len(settings.models))
    log.info(
        "comparing %d models over %d seeds (%d trainings) on %d training impressions",
        len(settings.models),
        len(settings.seeds),
        total,
        len(train),
    )
    started = time.perf_counter()
    records, done = [], 0
    with progress_bar("trainings") as bar:
        task = bar.add_task("compare", total=total)

        def step(label: str) -> None:
            nonlocal done
            done += 1
            bar.update(task, completed=done, description=label)
            elapsed = time.perf_counter() - started
            log.info(
                "[%d/%d] %s  (%.0f s elapsed, ~%.0f s left)",
                done,
                total,
                label,
                elapsed,
                elapsed / done * (total - done),
            )

        def run(kind: str, seed: int, split: EncodedSplit, reference, params: dict | None = None):
            model_settings = config.model.model_copy(update={"kind": kind, **(params or {})})
            model, result = fit(
                config,
                model_settings,
                encoder,
                split,
                val,
                seed=seed,
                data_fingerprint=fingerprint,
                checkpoint_dir=None,
                progress=False,
                reference_ctr=reference,
            )
            return model, result

        for seed in settings.seeds:
            reference, _ = run("ctr", seed, train, None)
            step(f"seed {seed}: reference CTR network")
            reference_pctr, _ = predict(reference, test.features)
            for kind in settings.models:
                params = None
                if settings.search and kind in search_grid:
                    params = _search(kind, seed, search_grid[kind], train, reference, run, step)
                model, result = run(kind, seed, train, reference, params)
                step(f"seed {seed}: {MODEL_LABELS.get(kind, kind)}")
                pctr, pcvr = predict(model, test.features)
                metrics = evaluate_predictions(
                    test.click.numpy(),
                    test.conversion.numpy(),
                    pctr,
                    pcvr,
                    test.true_cvr,
                    reference_pctr,
                )
                records.append(
                    {
                        "model": kind,
                        "seed": seed,
                        "best_epoch": result.best_epoch,
                        "parameter": _describe(kind, params, config),
                        **metrics,
                    }
                )

        sampling_records = []
        for rate in rates:
            subset = train.take(_sample_rows(len(train), rate, settings.seeds[0]))
            seed = settings.seeds[0]
            reference, _ = run("ctr", seed, subset, None)
            step(f"sampling rate {rate:.0%}: reference CTR network")
            for kind in settings.models:
                model, _ = run(kind, seed, subset, reference)
                step(f"sampling rate {rate:.0%}: {MODEL_LABELS.get(kind, kind)}")
                _, pcvr = predict(model, test.features)
                clicked = test.click.numpy() == 1
                auc_value = evaluate_predictions(
                    test.click.numpy(), test.conversion.numpy(), None, pcvr
                )["cvr_auc_clicked"]
                sampling_records.append(
                    {
                        "model": kind,
                        "rate": rate,
                        "cvr_auc_clicked": auc_value,
                        "clicks": int(clicked.sum()),
                    }
                )

    runs = pd.DataFrame.from_records(records)
    summary = summarise(runs, settings.models)
    first_seed = runs[runs["seed"] == settings.seeds[0]]
    full = first_seed[["model", "cvr_auc_clicked"]].assign(rate=1.0)
    sampling = pd.concat([pd.DataFrame.from_records(sampling_records), full], ignore_index=True)
    comparison = Comparison(runs, summary, sampling, folder, time.perf_counter() - started)
    write_outputs(comparison)
    return comparison


def _search(kind, seed, grid, train, reference, run, step) -> dict:
    """The grid value with the best validation CVR AUC (clicked), as the paper did."""
    scored = []
    for params in grid:
        _, result = run(kind, seed, train, reference, params)
        step(f"seed {seed}: {MODEL_LABELS[kind]} search {params}")
        scored.append((result.best_value, params))
    best_value, best = max(scored, key=lambda item: item[0])
    log.info("%s: chose %s (validation %.4f)", MODEL_LABELS[kind], best, best_value)
    return best


def _describe(kind: str, params: dict | None, config: Config) -> str:
    name = SEARCHED_PARAMETER.get(kind)
    if name is None:
        return ""
    value = (params or {}).get(name, getattr(config.model, name))
    return f"{name}={value}"


def _sample_rows(n: int, rate: float, seed: int) -> torch.Tensor:
    """A fixed random ``rate`` share of the training impressions (the same for every model)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=generator)[: round(rate * n)].sort().values


def summarise(runs: pd.DataFrame, models: list[str]) -> pd.DataFrame:
    metrics = [m for m in REPORTED_METRICS if m in runs.columns]
    grouped = runs.groupby("model", sort=False)[metrics]
    summary = grouped.mean().add_suffix("_mean").join(grouped.std(ddof=1).add_suffix("_std"))
    summary["seeds"] = grouped.size()
    summary["parameter"] = runs.groupby("model", sort=False)["parameter"].agg(
        lambda values: ", ".join(sorted({v for v in values if v}))
    )
    return summary.reindex([m for m in models if m in summary.index])


def results_markdown(comparison: Comparison) -> str:
    summary = comparison.summary
    columns = [m for m in REPORTED_METRICS if f"{m}_mean" in summary.columns]
    header = ["model", *(REPORTED_METRICS[m] for m in columns), "setting"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for kind, row in summary.iterrows():
        cells = [MODEL_LABELS.get(str(kind), str(kind))]
        for metric in columns:
            mean, std = row[f"{metric}_mean"], row[f"{metric}_std"]
            cells.append("—" if np.isnan(mean) else _format(metric, mean, std))
        cells.append(row["parameter"] or "")
        lines.append("| " + " | ".join(cells) + " |")
    seeds = int(summary["seeds"].max()) if len(summary) else 0
    lines.append("")
    lines.append(
        f"Mean ± standard deviation over {seeds} seeds, on the test days. AUCs in %. "
        "CTCVR AUC (shared pCTR) multiplies each model's pCVR by the pCTR of one independently "
        "trained CTR network per seed, as in the paper; (own pCTR) uses the model's own CTR "
        "output where it has one. Entire-space metrics need the true pCVR (simulated data)."
    )
    lines.append(
        f"{len(comparison.runs)} model trainings plus the reference CTR networks and the "
        f"sampling-rate runs took {comparison.seconds / 60:.1f} min."
    )
    return "\n".join(lines) + "\n"


def _format(metric: str, mean: float, std: float) -> str:
    std = 0.0 if np.isnan(std) else std
    if "auc" in metric:
        return f"{100 * mean:.2f} ± {100 * std:.2f}"
    return f"{mean:.4f} ± {std:.4f}"


def write_outputs(comparison: Comparison) -> None:
    folder = comparison.folder
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(folder / "runs.csv", comparison.runs.to_csv(index=False))
    write_text_atomic(folder / "results.csv", comparison.summary.reset_index().to_csv(index=False))
    write_text_atomic(folder / "results.md", results_markdown(comparison))
    write_text_atomic(folder / "sampling.csv", comparison.sampling.to_csv(index=False))
    plot_bars(comparison, folder)
    plot_sampling_rate(comparison, folder)


def plot_bars(comparison: Comparison, folder: Path) -> None:
    plt = pyplot()

    summary = comparison.summary
    labels = [MODEL_LABELS.get(str(m), str(m)) for m in summary.index]
    for metric in PLOTTED_METRICS:
        if f"{metric}_mean" not in summary.columns:
            continue
        means, stds = summary[f"{metric}_mean"], summary[f"{metric}_std"].fillna(0)
        figure, axis = plt.subplots(figsize=(8, 4))
        axis.bar(labels, means, yerr=stds, capsize=4, color="#4C72B0")
        finite = means.dropna()
        if len(finite):
            low = max(0.0, float((finite - stds[finite.index]).min()) - 0.02)
            axis.set_ylim(low, min(1.0, float((finite + stds[finite.index]).max()) + 0.02))
        axis.set_ylabel(REPORTED_METRICS[metric])
        axis.set_title(f"{REPORTED_METRICS[metric]}: mean ± std over seeds")
        axis.tick_params(axis="x", rotation=30)
        figure.tight_layout()
        save_figure(figure, folder / f"bars_{metric}.png")


def plot_sampling_rate(comparison: Comparison, folder: Path) -> None:
    plt = pyplot()

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for kind, rows in comparison.sampling.groupby("model", sort=False):
        rows = rows.sort_values("rate")
        axis.plot(
            100 * rows["rate"],
            rows["cvr_auc_clicked"],
            marker="o",
            label=MODEL_LABELS.get(str(kind), str(kind)),
        )
    axis.set_xlabel("training sampling rate (%)")
    axis.set_ylabel("CVR AUC (clicked test impressions)")
    axis.set_title("CVR AUC against training sampling rate (the paper's Figure 3)")
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    save_figure(figure, folder / "sampling_rate.png")


def update_document(document: Path, section: str, markdown: str, command: str) -> None:
    """Replace the block between ``<!-- BEGIN results:SECTION -->`` and ``<!-- END
    results:SECTION -->`` in ``document`` with ``markdown``, naming the command that made it,
    so the published table is always the command's output, never typed by hand."""
    text = document.read_text()
    begin, end = f"<!-- BEGIN results:{section} -->", f"<!-- END results:{section} -->"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.DOTALL)
    if not pattern.search(text):
        raise ValueError(f"{document}: no '{begin}' ... '{end}' block to update")
    block = f"{begin}\nProduced by `{command}`:\n\n{markdown}{end}"
    write_text_atomic(document, pattern.sub(lambda _: block, text))
