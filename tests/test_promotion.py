"""Promotion against a real (SQLite) registry: two pipelines finishing at once leave exactly
one champion and a complete decision on both versions; rollback needs a previous version."""

from __future__ import annotations

import threading

import pytest

from esmm.config import load_config
from esmm.data.sources import simulate_to_file
from esmm.prepare import load_prepared, prepare
from esmm.registry import (
    DECISION_TAG,
    RegistryError,
    aliases_of,
    promote_version,
    register_version,
    rollback,
)
from esmm.train import train_stage

NAME = "esmm-cvr-promotion-test"


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory):
    """Two registered versions of one small trained model (same weights)."""
    from esmm.tracking import Tracker

    folder = tmp_path_factory.mktemp("promotion")
    config = load_config(
        None,
        [
            f"output_dir={folder / 'out'}",
            "data.simulator.rows=20000",
            "data.simulator.days=4",
            "model.embedding_dim=4",
            "model.tower_dims=[16]",
            "train.epochs=2",
            "train.batch_size=256",
            "train.learning_rate=0.005",
            f"tracking.tracking_uri=sqlite:///{folder}/mlflow.db",
            "promote.calibration_range=[0.01, 100]",  # this test is about the lock, not quality
        ],
    )
    simulate_to_file(config)
    prepare(config)
    train_stage(config, progress=False)
    test = load_prepared(config).tables["test"]
    versions = []
    for _ in range(2):
        tracker = Tracker.start(config)
        model_uri = tracker.log_model(config.output_path / "model", test.slice(0, 20))
        versions.append(register_version(tracker.client, model_uri, NAME, tracker.run_id, {}))
        tracker.finish()
    return config, tracker, versions, test


def test_two_promotions_at_once_leave_one_champion(two_versions):
    config, tracker, versions, test = two_versions
    decisions, errors = {}, []

    def promote(version: str) -> None:
        try:
            decisions[version] = promote_version(
                tracker.client, tracker.uri, NAME, version, test, config.promote
            )
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
    assert aliases_of(tracker.client, NAME) == {"champion": champion, "challenger": challenger}
    assert decisions[challenger].champion_version == champion
    for version in versions:  # each decision is complete: its last tag is there
        tags = tracker.client.get_model_version(NAME, version).tags
        assert tags[DECISION_TAG] == decisions[version].decision
        assert tags["promotion.reason"] == decisions[version].reason

    with pytest.raises(RegistryError, match="no @previous version"):
        rollback(tracker.client, tracker.uri, NAME)
