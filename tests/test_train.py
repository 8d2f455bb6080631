"""The trainer: exact resumption, reproducible seeds, early stopping, clear divergence errors."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from esmm.config import TrainSettings
from esmm.data.encode import FeatureEncoder
from esmm.data.table import TableSchema
from esmm.models import build_model
from esmm.train import CheckpointMismatch, TrainingDiverged, predict, train_model

SCHEMA = TableSchema.of({"user": "single", "item": "single", "tags": "multi", "price": "dense"})


def synthetic_table(n: int, seed: int) -> pa.Table:
    """Clicks depend on the item, conversions on the user: small and learnable in seconds."""
    rng = np.random.default_rng(seed)
    user, item = rng.integers(0, 50, n), rng.integers(0, 80, n)
    lengths = rng.integers(0, 4, n)
    offsets = np.r_[0, np.cumsum(lengths)].astype(np.int32)
    tags = pa.ListArray.from_arrays(offsets, pa.array(rng.integers(0, 30, offsets[-1])))
    price = rng.normal(size=n)
    click = rng.random(n) < 1 / (1 + np.exp(-(np.where(item % 3 == 0, 1.5, -2.5))))
    conversion = click & (rng.random(n) < np.where(user % 2 == 0, 0.6, 0.1))
    return pa.table(
        {
            "user": user,
            "item": item,
            "tags": tags,
            "price": price,
            "click": click.astype(np.int8),
            "conversion": conversion.astype(np.int8),
        }
    )


@pytest.fixture(scope="module")
def data():
    train_table, val_table = synthetic_table(6000, 0), synthetic_table(2000, 1)
    encoder = FeatureEncoder.fit(train_table, SCHEMA)
    return encoder, encoder.encode_split(train_table), encoder.encode_split(val_table)


def fresh_model(encoder, seed=0):
    torch.manual_seed(seed)
    return build_model({"kind": "esmm", "embedding_dim": 8, "tower_dims": [32, 16]}, encoder)


SETTINGS = TrainSettings(batch_size=256, epochs=4, learning_rate=0.005, patience=10)


def assert_same_weights(a, b):
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


def test_learns_the_signal(data):
    encoder, train, val = data
    model = fresh_model(encoder)
    result = train_model(model, train, val, SETTINGS, seed=0, progress=False)
    best = result.history[result.best_epoch - 1].val_metrics
    assert best["ctr_auc"] > 0.8
    assert best["cvr_auc_clicked"] > 0.7  # the ideal scorer reaches about 0.78 here
    assert best["ctcvr_auc"] > 0.75
    assert result.history[-1].train_loss < result.history[0].train_loss


def test_same_seed_same_weights_and_different_seed_differs(data):
    encoder, train, val = data
    settings = SETTINGS.model_copy(update={"epochs": 1})
    a, b, c = fresh_model(encoder), fresh_model(encoder), fresh_model(encoder, seed=1)
    for model, seed in ((a, 0), (b, 0), (c, 1)):
        train_model(model, train, val, settings, seed=seed, progress=False)
    assert_same_weights(a, b)
    assert not torch.equal(a.ctr_tower[0].weight, c.ctr_tower[0].weight)


class Killed(Exception):
    pass


def test_resume_after_interruption_gives_the_same_final_weights(data, tmp_path):
    encoder, train, val = data
    uninterrupted = fresh_model(encoder)
    full = train_model(uninterrupted, train, val, SETTINGS, seed=3, progress=False)

    def kill_after_epoch_2(epoch_result):
        if epoch_result.epoch == 2:
            raise Killed

    interrupted = fresh_model(encoder)
    with pytest.raises(Killed):
        train_model(
            interrupted,
            train,
            val,
            SETTINGS,
            seed=3,
            progress=False,
            checkpoint_dir=tmp_path,
            callbacks=[kill_after_epoch_2],
            signature="run-a",
        )
    assert (tmp_path / "last.pt").exists()
    assert not list(tmp_path.glob("*.tmp"))

    resumed_model = fresh_model(encoder, seed=99)  # a new process would start from scratch
    resumed = train_model(
        resumed_model,
        train,
        val,
        SETTINGS,
        seed=3,
        progress=False,
        checkpoint_dir=tmp_path,
        resume=True,
        signature="run-a",
    )
    assert [h.epoch for h in resumed.history] == [1, 2, 3, 4]
    assert resumed.best_epoch == full.best_epoch
    assert_same_weights(uninterrupted, resumed_model)


def test_early_stopping_restores_best_epoch(data):
    encoder, train, val = data
    settings = SETTINGS.model_copy(
        update={"epochs": 30, "patience": 1, "monitor": "val_loss", "learning_rate": 0.03}
    )
    model = fresh_model(encoder)
    result = train_model(model, train, val, settings, seed=0, progress=False)
    assert result.stopped_early
    assert len(result.history) < 30
    losses = [h.val_metrics["val_loss"] for h in result.history]
    assert result.best_value == min(losses)
    assert result.best_epoch == 1 + int(np.argmin(losses))


def test_diverging_loss_is_a_clear_error(data):
    encoder, train, val = data
    train.features.dense[7, 0] = float("nan")  # one poisoned row
    try:
        with pytest.raises(TrainingDiverged, match=r"loss became nan at epoch 1, step \d+"):
            train_model(fresh_model(encoder), train, val, SETTINGS, seed=0, progress=False)
    finally:
        train.features.dense[7, 0] = 0.0


def test_predictions_are_probabilities_in_unit_interval(data):
    encoder, _, val = data
    pctr, pcvr = predict(fresh_model(encoder), val.features, batch_size=333)
    assert pctr.shape == pcvr.shape == (len(val),)
    assert ((pctr > 0) & (pctr < 1) & (pcvr > 0) & (pcvr < 1)).all()


def test_resume_refuses_a_checkpoint_from_another_run(data, tmp_path):
    encoder, train, val = data
    settings = SETTINGS.model_copy(update={"epochs": 1})
    train_model(
        fresh_model(encoder),
        train,
        val,
        settings,
        seed=0,
        progress=False,
        checkpoint_dir=tmp_path,
        signature="run-a",
    )
    with pytest.raises(CheckpointMismatch, match="other data, model or settings"):
        train_model(
            fresh_model(encoder),
            train,
            val,
            settings,
            seed=0,
            progress=False,
            checkpoint_dir=tmp_path,
            resume=True,
            signature="run-b",
        )


def test_train_stage_resumes_its_own_checkpoint_with_a_larger_epoch_budget(tmp_path):
    """`esmm train --resume` end to end: the checkpoint carries the run's signature (data,
    seed, model, settings), so the same run continues and only the epoch budget may grow."""
    from esmm.config import load_config
    from esmm.data.sources import simulate_to_file
    from esmm.prepare import prepare
    from esmm.train import train_stage

    overrides = [
        f"output_dir={tmp_path}",
        "data.simulator.rows=8000",
        "data.simulator.days=4",
        "model.embedding_dim=4",
        "model.tower_dims=[8]",
        "train.patience=5",
    ]
    config = load_config(None, [*overrides, "train.epochs=1"])
    simulate_to_file(config)
    prepare(config)
    train_stage(config, progress=False)
    longer = load_config(None, [*overrides, "train.epochs=2"])
    _, result = train_stage(longer, resume=True, progress=False)
    assert [h.epoch for h in result.history] == [1, 2]
    other_seed = load_config(None, [*overrides, "train.epochs=2", "seed=1"])
    with pytest.raises(CheckpointMismatch):
        train_stage(other_seed, resume=True, progress=False)
