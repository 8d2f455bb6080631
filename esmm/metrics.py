"""Evaluation metrics, with one definition used everywhere (DESIGN.md, "Evaluation").

Every AUC is computed once over the whole set (never averaged over batches), with tied scores
given their average rank, so it equals scikit-learn's ``roc_auc_score``. Each metric name says
which label and which impressions it uses:

- ``cvr_auc_clicked``: label z on clicked impressions, score pCVR (the paper's CVR AUC).
- ``ctcvr_auc``: label y*z on all impressions, score pCTR*pCVR.
- ``ctr_auc``: label y on all impressions, score pCTR.
- ``cvr_auc_all``: label y*z on all impressions, score pCVR (the protocol of torch-rechub, NISE).
- simulated data only: ``cvr_auc_entire_space`` (every impression, with a counterfactual
  conversion label drawn from ``true_cvr`` with a fixed seed) and the bias/error of pCVR against
  ``true_cvr`` on unclicked impressions.
"""

from __future__ import annotations

import numpy as np

COUNTERFACTUAL_SEED = 20180708  # fixed: every model is scored against the same drawn labels
_EPS = 1e-7


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve via the rank-sum (Mann-Whitney) statistic; NaN if one class
    is absent. Ties share their average rank."""
    labels = np.asarray(labels).astype(bool, copy=False).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    # Average rank of each run of tied scores (1-based ranks).
    run_starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    run_ends = np.r_[run_starts[1:], sorted_scores.size]
    average_rank = (run_starts + run_ends + 1) / 2.0
    ranks = np.empty(scores.size, dtype=np.float64)
    ranks[order] = np.repeat(average_rank, run_ends - run_starts)
    rank_sum = ranks[labels].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def log_loss(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """Mean binary cross-entropy, probabilities clipped to [1e-7, 1-1e-7]."""
    labels = np.asarray(labels, dtype=np.float64).ravel()
    if labels.size == 0:
        return float("nan")
    p = np.clip(np.asarray(probabilities, dtype=np.float64).ravel(), _EPS, 1 - _EPS)
    return float(-np.mean(labels * np.log(p) + (1 - labels) * np.log1p(-p)))


def calibration_ratio(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """Mean predicted probability divided by the observed rate (1.0 = calibrated on average)."""
    observed = float(np.mean(labels)) if np.size(labels) else float("nan")
    if not observed:
        return float("nan")
    return float(np.mean(probabilities)) / observed


def expected_calibration_error(
    labels: np.ndarray, probabilities: np.ndarray, n_bins: int = 10
) -> float:
    """ECE over equal-mass bins of the predicted probability: the row-weighted mean of
    |mean predicted - observed rate| per bin. Equal-mass bins, because CVR predictions crowd
    near zero and equal-width bins would put almost every row in the first bin."""
    labels = np.asarray(labels, dtype=np.float64).ravel()
    p = np.asarray(probabilities, dtype=np.float64).ravel()
    if labels.size == 0:
        return float("nan")
    # Bin edges at quantiles of p; equal predictions always share a bin.
    inner_edges = np.quantile(p, np.linspace(0, 1, n_bins + 1)[1:-1])
    bin_of_row = np.searchsorted(inner_edges, p, side="right")
    rows = np.bincount(bin_of_row, minlength=n_bins)
    predicted = np.bincount(bin_of_row, weights=p, minlength=n_bins)
    observed = np.bincount(bin_of_row, weights=labels, minlength=n_bins)
    gaps = np.abs(predicted - observed)  # = rows * |mean predicted - observed rate| per bin
    return float(gaps[rows > 0].sum() / labels.size)


def evaluate_predictions(
    click: np.ndarray,
    conversion: np.ndarray,
    pctr: np.ndarray | None,
    pcvr: np.ndarray | None,
    true_cvr: np.ndarray | None = None,
    reference_pctr: np.ndarray | None = None,
) -> dict[str, float]:
    """All metrics for one set of predictions. ``pctr`` is None for models without a CTR
    output of their own (BASE and its variants), ``pcvr`` None for a lone CTR network.
    ``reference_pctr`` (from an independently trained CTR network shared by every compared
    model, as in the paper) adds ``ctcvr_auc_reference_ctr``; ``true_cvr`` (simulated data)
    adds the entire-space metrics."""
    click = np.asarray(click).astype(np.int8, copy=False).ravel()
    conversion = np.asarray(conversion).astype(np.int8, copy=False).ravel()
    clicked = click == 1
    ctcvr_label = click * conversion
    metrics: dict[str, float] = {}
    if pctr is not None:
        pctr = np.asarray(pctr, dtype=np.float64).ravel()
        metrics |= {
            "ctr_auc": auc(click, pctr),
            "ctr_logloss": log_loss(click, pctr),
            "ctr_calibration": calibration_ratio(click, pctr),
            "ctr_ece": expected_calibration_error(click, pctr),
        }
    if pcvr is None:
        return metrics
    pcvr = np.asarray(pcvr, dtype=np.float64).ravel()
    metrics |= {
        "cvr_auc_clicked": auc(conversion[clicked], pcvr[clicked]),
        "cvr_auc_all": auc(ctcvr_label, pcvr),
        "cvr_logloss_clicked": log_loss(conversion[clicked], pcvr[clicked]),
        "cvr_calibration_clicked": calibration_ratio(conversion[clicked], pcvr[clicked]),
        "cvr_ece_clicked": expected_calibration_error(conversion[clicked], pcvr[clicked]),
    }
    if pctr is not None:
        pctcvr = pctr * pcvr
        metrics |= {
            "ctcvr_auc": auc(ctcvr_label, pctcvr),
            "ctcvr_logloss": log_loss(ctcvr_label, pctcvr),
            "ctcvr_calibration": calibration_ratio(ctcvr_label, pctcvr),
        }
    if reference_pctr is not None:
        reference = np.asarray(reference_pctr, dtype=np.float64).ravel()
        metrics["ctcvr_auc_reference_ctr"] = auc(ctcvr_label, reference * pcvr)
    if true_cvr is not None:
        metrics.update(entire_space_metrics(click, pcvr, np.asarray(true_cvr, dtype=np.float64)))
    return metrics


def counterfactual_conversions(true_cvr: np.ndarray, seed: int = COUNTERFACTUAL_SEED) -> np.ndarray:
    """A conversion label for every impression as if it had been clicked, drawn from the true
    pCVR with a fixed seed, so every model is scored against the same labels."""
    rng = np.random.default_rng(seed)
    return (rng.random(np.size(true_cvr)) < np.ravel(true_cvr)).astype(np.int8)


def entire_space_metrics(
    click: np.ndarray, pcvr: np.ndarray, true_cvr: np.ndarray
) -> dict[str, float]:
    """Sample selection bias, measured directly (possible only where the truth is known):
    CVR AUC over every impression against counterfactual labels, and the error of pCVR against
    the true pCVR on the impressions that were NOT clicked (those click-only training never sees).
    """
    true_cvr = np.ravel(true_cvr)
    unclicked = np.ravel(click) == 0
    error_unclicked = pcvr[unclicked] - true_cvr[unclicked]
    clicked_error = pcvr[~unclicked] - true_cvr[~unclicked]
    return {
        "cvr_auc_entire_space": auc(counterfactual_conversions(true_cvr), pcvr),
        "cvr_auc_entire_space_true": _auc_against_truth(true_cvr, pcvr),
        "pcvr_bias_unclicked": float(error_unclicked.mean()) if error_unclicked.size else np.nan,
        "pcvr_mae_unclicked": float(np.abs(error_unclicked).mean())
        if error_unclicked.size
        else np.nan,
        "pcvr_bias_clicked": float(clicked_error.mean()) if clicked_error.size else np.nan,
        "true_cvr_mean_unclicked": float(true_cvr[unclicked].mean()) if unclicked.any() else np.nan,
        "pcvr_mean_unclicked": float(pcvr[unclicked].mean()) if unclicked.any() else np.nan,
    }


def _auc_against_truth(true_cvr: np.ndarray, pcvr: np.ndarray) -> float:
    """Expected entire-space CVR AUC: each impression counted as a positive with weight
    true_cvr and as a negative with weight 1-true_cvr (no sampling noise)."""
    order = np.argsort(pcvr, kind="mergesort")
    scores = pcvr[order]
    positive_weight = true_cvr[order]
    negative_weight = 1.0 - positive_weight
    # For each impression: weight of negatives ranked strictly below, plus half the tied ones.
    run_starts = np.flatnonzero(np.r_[True, scores[1:] != scores[:-1]])
    run_ids = np.cumsum(np.r_[True, scores[1:] != scores[:-1]]) - 1
    negatives_per_run = np.add.reduceat(negative_weight, run_starts)
    negatives_below_run = np.r_[0.0, np.cumsum(negatives_per_run)[:-1]]
    wins = negatives_below_run[run_ids] + 0.5 * negatives_per_run[run_ids]
    self_pairs = positive_weight * negative_weight  # an impression is never paired with itself
    numerator = (positive_weight * wins).sum() - 0.5 * self_pairs.sum()
    total = positive_weight.sum() * negative_weight.sum() - self_pairs.sum()
    return float(numerator / total) if total > 0 else float("nan")
