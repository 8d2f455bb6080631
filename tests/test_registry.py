"""The promotion rule on numbers alone, the per-model lock, and MLflow params hygiene."""

from __future__ import annotations

import threading
import time

import pytest

from esmm.config import PromoteSettings, load_config
from esmm.registry import decide, promotion_lock
from esmm.tracking import flatten_config, redact

SETTINGS = PromoteSettings(metric="cvr_auc_clicked", min_improvement=0.002)
GOOD = {"cvr_auc_clicked": 0.710, "ctcvr_calibration": 1.05, "ctcvr_auc": 0.78}


def test_first_model_becomes_champion():
    decision = decide("m", "1", GOOD, None, None, SETTINGS)
    assert decision.promoted and "no champion" in decision.reason


def test_better_by_the_margin_is_promoted_and_less_is_not():
    champion = {**GOOD, "cvr_auc_clicked": 0.705}
    assert decide("m", "2", GOOD, "1", champion, SETTINGS).promoted  # +0.005 >= 0.002
    close = {**GOOD, "cvr_auc_clicked": 0.709}
    decision = decide("m", "2", GOOD, "1", close, SETTINGS)  # +0.001 < 0.002
    assert decision.decision == "challenger"
    assert "0.7100 < champion v1 0.7090 + margin 0.002" in decision.reason
    tags = decision.tags()
    assert list(tags)[-1] == "promotion.decision"  # written last: its presence marks a decision
    assert tags["promotion.champion_version"] == "1"


@pytest.mark.parametrize(
    ("metrics", "failure"),
    [
        ({**GOOD, "ctcvr_calibration": 3.0}, "ctcvr_calibration 3.000 outside [0.5, 2.0]"),
        ({**GOOD, "ctcvr_auc": float("nan")}, "non-finite: ctcvr_auc"),
        ({"cvr_auc_clicked": 0.8}, "ctcvr_calibration not reported"),
    ],
)
def test_guardrails_block_promotion_even_when_forced(metrics, failure):
    for force in (False, True):
        decision = decide("m", "2", metrics, None, None, SETTINGS, force=force)
        assert decision.decision == "challenger"
        assert failure in decision.reason


def test_a_champion_that_cannot_score_is_replaced_with_the_reason_recorded():
    decision = decide("m", "3", GOOD, "2", None, SETTINGS, champion_error="DataError: columns")
    assert decision.promoted and "cannot score the current test data" in decision.reason


def test_forced_promotion_is_marked():
    worse = {**GOOD, "cvr_auc_clicked": 0.6}
    decision = decide("m", "2", worse, "1", GOOD, SETTINGS, force=True)
    assert decision.promoted and decision.tags()["promotion.forced"] == "true"


def test_promotion_lock_serialises_two_pipelines(tmp_path):
    """Two decisions on one model never overlap (two pipelines finishing at once)."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    inside, overlaps = [], []

    def decide_slowly():
        with promotion_lock(uri, "m"):
            inside.append(1)
            if len(inside) > 1:
                overlaps.append(True)
            time.sleep(0.2)
            inside.pop()

    threads = [threading.Thread(target=decide_slowly) for _ in range(2)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not overlaps
    assert time.perf_counter() - started >= 0.4


def test_params_are_flat_and_passwords_redacted():
    config = load_config(
        None, ["tune.storage=postgresql://optuna:s3cret@db:5432/optuna", "train.epochs=3"]
    )
    params = flatten_config(config)
    assert params["train.epochs"] == "3"
    assert params["tune.storage"] == "postgresql://optuna:***@db:5432/optuna"
    assert "s3cret" not in " ".join(params.values())
    assert redact("sqlite:///tmp/x.db") == "sqlite:///tmp/x.db"
