"""Metrics match their definitions and scikit-learn, over the whole set."""

import numpy as np
import pytest
from sklearn.metrics import log_loss as sk_log_loss
from sklearn.metrics import roc_auc_score

from esmm.metrics import (
    _auc_against_truth,
    auc,
    calibration_ratio,
    counterfactual_conversions,
    evaluate_predictions,
    expected_calibration_error,
    log_loss,
)


@pytest.mark.parametrize("seed", range(5))
def test_auc_equals_sklearn_on_random_data_with_ties(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(5000) < 0.1
    scores = np.round(rng.random(5000) + labels * 0.3, 2)  # rounding makes many ties
    assert auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_auc_edge_cases():
    assert auc([1, 0], [0.9, 0.1]) == 1.0
    assert auc([1, 0], [0.1, 0.9]) == 0.0
    assert auc([1, 0, 1, 0], [0.5, 0.5, 0.5, 0.5]) == 0.5
    assert np.isnan(auc([1, 1], [0.2, 0.3]))
    assert np.isnan(auc([], []))


def test_auc_over_whole_set_differs_from_batch_average():
    # A classic pitfall: averaging per-batch AUCs. Our AUC is computed once over all rows.
    rng = np.random.default_rng(0)
    labels = np.r_[np.ones(50), np.zeros(950), np.ones(50), np.zeros(950)]
    scores = np.r_[rng.random(1000) * 0.5, rng.random(1000) * 0.5 + 0.5]
    whole = auc(labels, scores)
    batched = np.mean([auc(labels[:1000], scores[:1000]), auc(labels[1000:], scores[1000:])])
    assert whole == pytest.approx(roc_auc_score(labels, scores))
    assert abs(whole - batched) > 0.01


def test_log_loss_and_calibration():
    rng = np.random.default_rng(1)
    p = rng.random(1000) * 0.9 + 0.05
    y = (rng.random(1000) < p).astype(int)
    assert log_loss(y, p) == pytest.approx(sk_log_loss(y, p), rel=1e-9)
    assert calibration_ratio([0, 1, 0, 1], [0.25, 0.25, 0.25, 0.25]) == pytest.approx(0.5)
    assert np.isnan(calibration_ratio([0, 0], [0.1, 0.2]))


def test_expected_calibration_error():
    # Perfectly calibrated by construction in each equal-mass bin: ECE 0.
    p = np.repeat(np.linspace(0.05, 0.95, 10), 100)
    y = np.concatenate(
        [
            np.r_[np.ones(int(q * 100)), np.zeros(100 - int(q * 100))]
            for q in np.linspace(0.05, 0.95, 10)
        ]
    )
    assert expected_calibration_error(y, p) == pytest.approx(0.0, abs=0.011)
    # Predicting 0.5 for a 10% event: off by 0.4 everywhere.
    y = np.r_[np.ones(100), np.zeros(900)]
    assert expected_calibration_error(y, np.full(1000, 0.5)) == pytest.approx(0.4)


def test_evaluate_predictions_scores_the_right_output_per_metric():
    rng = np.random.default_rng(2)
    n = 20000
    click = (rng.random(n) < 0.2).astype(np.int8)
    conversion = (click & (rng.random(n) < 0.3)).astype(np.int8)
    pctr = np.where(click == 1, 0.6, 0.4) + rng.random(n) * 0.1  # informative about clicks only
    pcvr = np.full(n, 0.3) + rng.random(n) * 0.01  # uninformative about conversion
    metrics = evaluate_predictions(click, conversion, pctr, pcvr)
    assert metrics["ctr_auc"] > 0.99
    assert metrics["cvr_auc_clicked"] == pytest.approx(0.5, abs=0.05)
    assert metrics["ctr_auc"] != metrics["cvr_auc_clicked"]
    clicked = click == 1
    assert metrics["cvr_auc_clicked"] == pytest.approx(
        roc_auc_score(conversion[clicked], pcvr[clicked])
    )
    assert metrics["ctcvr_auc"] == pytest.approx(roc_auc_score(click * conversion, pctr * pcvr))
    assert metrics["cvr_auc_all"] == pytest.approx(roc_auc_score(click * conversion, pcvr))


def test_entire_space_metrics_on_known_truth():
    rng = np.random.default_rng(3)
    n = 50000
    true_cvr = rng.beta(1, 8, n)
    click = (rng.random(n) < 0.1).astype(np.int8)
    conversion = (click & (rng.random(n) < true_cvr)).astype(np.int8)
    perfect = evaluate_predictions(click, conversion, np.full(n, 0.1), true_cvr, true_cvr=true_cvr)
    assert perfect["pcvr_bias_unclicked"] == 0.0
    assert perfect["pcvr_mae_unclicked"] == 0.0
    shifted = evaluate_predictions(
        click, conversion, np.full(n, 0.1), true_cvr * 0.5, true_cvr=true_cvr
    )
    unclicked = click == 0
    assert shifted["pcvr_bias_unclicked"] == pytest.approx(-0.5 * true_cvr[unclicked].mean())
    # Ranking is unchanged by scaling, so the entire-space AUC is unchanged.
    assert shifted["cvr_auc_entire_space"] == pytest.approx(perfect["cvr_auc_entire_space"])
    labels = counterfactual_conversions(true_cvr)
    assert perfect["cvr_auc_entire_space"] == pytest.approx(roc_auc_score(labels, true_cvr))
    # Same fixed seed: every model is scored against the same counterfactual labels.
    np.testing.assert_array_equal(labels, counterfactual_conversions(true_cvr))


def test_expected_auc_against_truth_matches_monte_carlo():
    rng = np.random.default_rng(4)
    true_cvr = rng.beta(2, 5, 3000)
    score = true_cvr + rng.normal(0, 0.1, 3000)
    draws = [roc_auc_score(rng.random(3000) < true_cvr, score) for _ in range(200)]
    assert _auc_against_truth(true_cvr, score) == pytest.approx(np.mean(draws), abs=0.003)
