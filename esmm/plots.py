"""Evaluation plots of one model (ROC and calibration), written as PNG files.

Curves are computed with NumPy over whole columns (one sort per curve); matplotlib draws them
off screen (Agg), and every file is written through a temporary path and renamed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from esmm.atomic import atomic_path

CALIBRATION_BINS = 20


def pyplot():
    """matplotlib.pyplot on the off-screen backend (imported on first use: it is slow)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=110, format="png")
    pyplot().close(figure)


def roc_points(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False and true positive rates at every distinct score threshold."""
    order = np.argsort(-scores, kind="stable")
    labels, scores = labels[order], scores[order]
    last_of_each_score = np.r_[np.flatnonzero(np.diff(scores)), labels.size - 1]
    true_positives = np.cumsum(labels)[last_of_each_score]
    false_positives = (last_of_each_score + 1) - true_positives
    positives, negatives = max(labels.sum(), 1), max(labels.size - labels.sum(), 1)
    return (
        np.r_[0.0, false_positives / negatives],
        np.r_[0.0, true_positives / positives],
    )


def calibration_points(
    labels: np.ndarray, probabilities: np.ndarray, bins: int = CALIBRATION_BINS
) -> tuple[np.ndarray, np.ndarray]:
    """Mean predicted against observed rate in equal-count bins of the prediction."""
    order = np.argsort(probabilities, kind="stable")
    groups = np.array_split(order, min(bins, max(1, order.size)))
    predicted = np.array([probabilities[g].mean() for g in groups if g.size])
    observed = np.array([labels[g].mean() for g in groups if g.size])
    return predicted, observed


def _curves(
    click: np.ndarray, conversion: np.ndarray, pctr: np.ndarray | None, pcvr: np.ndarray | None
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(labels, scores) per task, on the impressions each is defined on."""
    curves = {}
    if pctr is not None:
        curves["CTR (all)"] = (click, pctr)
    if pcvr is not None:
        clicked = click == 1
        curves["CVR (clicked)"] = (conversion[clicked], pcvr[clicked])
    if pctr is not None and pcvr is not None:
        curves["CTCVR (all)"] = (click * conversion, pctr * pcvr)
    return curves


def write_evaluation_plots(
    folder: str | Path,
    click: np.ndarray,
    conversion: np.ndarray,
    pctr: np.ndarray | None,
    pcvr: np.ndarray | None,
    title: str = "",
) -> list[Path]:
    """``roc.png`` and ``calibration.png`` for every task the model predicts."""
    from esmm.metrics import auc

    plt = pyplot()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    click = np.asarray(click).astype(np.int64)
    conversion = np.asarray(conversion).astype(np.int64)
    curves = _curves(click, conversion, pctr, pcvr)

    figure, axis = plt.subplots(figsize=(5.5, 5))
    for name, (labels, scores) in curves.items():
        fpr, tpr = roc_points(labels, scores)
        axis.plot(fpr, tpr, label=f"{name}: AUC {auc(labels, scores):.4f}")
    axis.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    axis.set(xlabel="false positive rate", ylabel="true positive rate", title=f"ROC {title}")
    axis.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    save_figure(figure, folder / "roc.png")

    figure, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 4), squeeze=False)
    for axis, (name, (labels, scores)) in zip(axes[0], curves.items(), strict=True):
        predicted, observed = calibration_points(labels, scores)
        top = max(predicted.max(), observed.max()) * 1.05
        axis.plot([0, top], [0, top], color="grey", linestyle=":", linewidth=1)
        axis.plot(predicted, observed, marker="o", markersize=3)
        axis.set(xlabel="mean predicted", ylabel="observed rate", title=name)
    figure.suptitle(f"Calibration (equal-count bins) {title}")
    figure.tight_layout()
    save_figure(figure, folder / "calibration.png")
    return [folder / "roc.png", folder / "calibration.png"]
