"""Promotion against a real (SQLite) registry: two pipelines finishing at once leave exactly
one champion and a complete decision on both versions; rollback needs a previous version."""

from __future__ import annotations

import threading

import pytest
from trained_models import log_trained_model, train_small_model

from esmm.registry import (
    DECISION_TAG,
    RegistryError,
    aliases_of,
    promote_version,
    register_version,
    rollback,
)

NAME = "esmm-cvr-promotion-test"


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory):
    """Two registered versions of one small trained model (same weights)."""
    from esmm.tracking import connect

    config, test = train_small_model(
        tmp_path_factory.mktemp("promotion"),
        "data.simulator.rows=20000",
        "train.epochs=2",
        "train.batch_size=256",
        "train.learning_rate=0.005",
        "promote.calibration_range=[0.01, 100]",  # this test is about the lock, not quality
    )
    client, _ = connect(config.tracking)
    versions = []
    for _ in range(2):
        model_uri, run_id = log_trained_model(config, test)
        versions.append(register_version(client, model_uri, NAME, run_id, {}))
    return config, client, versions, test


def test_two_promotions_at_once_leave_one_champion(two_versions):
    config, client, versions, test = two_versions
    store = config.tracking.tracking_uri
    decisions, errors = {}, []

    def promote(version: str) -> None:
        try:
            decisions[version] = promote_version(client, store, NAME, version, test, config.promote)
        except Exception as error:  # surfaced by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=promote, args=(v,)) for v in versions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    outcomes = sorted(d.decision for d in decisions.values())
    assert outcomes == ["challenger", "champion"]  # the second compared with the first
    champion = next(v for v, d in decisions.items() if d.promoted)
    challenger = next(v for v, d in decisions.items() if not d.promoted)
    assert aliases_of(client, NAME) == {"champion": champion, "challenger": challenger}
    assert decisions[challenger].champion_version == champion
    for version in versions:  # each decision is complete: its last tag is there
        tags = client.get_model_version(NAME, version).tags
        assert tags[DECISION_TAG] == decisions[version].decision
        assert tags["promotion.reason"] == decisions[version].reason

    with pytest.raises(RegistryError, match="no @previous version"):
        rollback(client, store, NAME)
