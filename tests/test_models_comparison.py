"""The paper's comparison models and ESCM2: each trains, and each samples or weights exactly
as configured."""

import numpy as np
import pytest
import torch

from esmm.config import ModelSettings, TrainSettings
from esmm.data.encode import FeatureEncoder
from esmm.data.simulate import simulate_impressions, simulator_schema
from esmm.models import MODEL_KINDS, build_model
from esmm.models.comparison import CTRNetwork, unbias_acceptance
from esmm.models.escm2 import propensity_weights
from esmm.train import _training_rows, predict, train_model


@pytest.fixture(scope="module")
def splits():
    table = simulate_impressions(20_000, n_days=4, seed=5)
    days = table["day"].to_numpy()
    encoder = FeatureEncoder.fit(table.filter(days < 3), simulator_schema())
    train = encoder.encode_split(table.filter(days < 3))
    val = encoder.encode_split(table.filter(days == 3))
    return encoder, train, val


SMALL = {"embedding_dim": 8, "tower_dims": [32, 16]}
ONE_EPOCH = TrainSettings(epochs=1, batch_size=512, learning_rate=0.003)


def trained_reference(encoder, train, val) -> CTRNetwork:
    torch.manual_seed(0)
    reference = build_model({"kind": "ctr", **SMALL}, encoder)
    train_model(
        reference,
        train,
        val,
        ONE_EPOCH.model_copy(update={"monitor": "ctr_auc"}),
        seed=0,
        progress=False,
    )
    return reference


@pytest.mark.parametrize("kind", [k for k in MODEL_KINDS if k != "ctr"])
def test_every_model_trains_one_epoch_and_gives_finite_pcvr(splits, kind):
    encoder, train, val = splits
    reference = trained_reference(encoder, train, val) if kind == "unbias" else None
    torch.manual_seed(0)
    settings = ModelSettings(kind=kind, **SMALL).model_dump()
    model = build_model(settings, encoder, reference)
    result = train_model(model, train, val, ONE_EPOCH, seed=0, progress=False)
    assert np.isfinite(result.history[0].train_loss)
    pctr, pcvr = predict(model, val.features)
    assert np.isfinite(pcvr).all() and (pcvr >= 0).all() and (pcvr <= 1).all()
    has_own_pctr = kind not in {"base", "aman", "oversampling", "unbias"}
    assert (pctr is not None) == has_own_pctr
    assert np.isfinite(result.history[0].val_metrics["cvr_auc_clicked"])


def test_division_clips_the_ratio_to_one(splits):
    encoder, _, val = splits
    torch.manual_seed(0)
    model = build_model({"kind": "division", **SMALL}, encoder)
    with torch.no_grad():  # make pCTCVR exceed pCTR: the raw ratio would be above 1
        model.ctcvr_tower[-1].bias.fill_(5.0)
        model.ctr_tower[-1].bias.fill_(-5.0)
        output = model(val.features.slice(0, 100))
    raw_ratio = output.pctcvr / output.pctr
    assert (raw_ratio > 1).all()
    assert torch.equal(output.pcvr, torch.ones(100))


def test_base_trains_on_clicked_rows_only(splits):
    encoder, train, _ = splits
    model = build_model({"kind": "base", **SMALL}, encoder)
    rows = _training_rows(model, train, seed=0)
    assert rows.numel() == int(train.click.sum())
    assert (train.click[rows] == 1).all()


@pytest.mark.parametrize("rate", [0.1, 0.5, 1.0])
def test_aman_adds_exactly_the_configured_share_of_unclicked_negatives(splits, rate):
    encoder, train, _ = splits
    model = build_model({"kind": "aman", "negative_rate": rate, **SMALL}, encoder)
    rows = _training_rows(model, train, seed=0)
    n_clicked = int(train.click.sum())
    n_unclicked = len(train) - n_clicked
    assert rows.numel() == n_clicked + round(rate * n_unclicked)
    assert int((train.click[rows] == 0).sum()) == round(rate * n_unclicked)
    assert rows.unique().numel() == rows.numel()  # sampled without replacement


@pytest.mark.parametrize("factor", [1, 2, 5])
def test_oversampling_repeats_each_conversion_factor_times(splits, factor):
    encoder, train, _ = splits
    model = build_model({"kind": "oversampling", "oversampling_factor": factor, **SMALL}, encoder)
    rows = _training_rows(model, train, seed=0)
    n_clicked = int(train.click.sum())
    n_converted = int((train.click * train.conversion).sum())
    assert rows.numel() == n_clicked + (factor - 1) * n_converted
    converted_rows = rows[train.conversion[rows] == 1]
    counts = torch.bincount(converted_rows)
    assert set(counts[counts > 0].tolist()) == {factor}


def test_unbias_acceptance_follows_inverse_pctr():
    pctr = torch.linspace(0.001, 0.5, 1001)
    acceptance = unbias_acceptance(pctr)
    floor = torch.quantile(pctr.double(), 0.01).float()
    above = pctr >= floor
    torch.testing.assert_close(acceptance[above] * pctr[above], floor.expand(int(above.sum())))
    assert (acceptance[~above] == 1.0).all()  # the lowest percentile is always kept
    assert acceptance.max() == 1.0 and (acceptance > 0).all()


def test_unbias_keeps_clicks_at_the_rate_of_their_acceptance(splits):
    encoder, train, val = splits
    reference = trained_reference(encoder, train, val)
    model = build_model({"kind": "unbias", **SMALL}, encoder, reference)
    rows = _training_rows(model, train, seed=0)
    clicked = torch.nonzero(train.click == 1).squeeze(1)
    with torch.no_grad():
        expected = unbias_acceptance(reference(train.features.take(clicked)).pctr).sum()
    assert (train.click[rows] == 1).all()
    assert abs(rows.numel() - float(expected)) < 4 * float(expected) ** 0.5
    # The reference network is frozen: UNBIAS never trains it.
    assert not any(p.requires_grad for p in model.reference_ctr.parameters())


def test_escm2_propensity_weights_are_clipped():
    pctr = torch.tensor([0.001, 0.02, 0.05, 0.5], requires_grad=True)
    weights = propensity_weights(pctr, clip=0.05)
    torch.testing.assert_close(weights, torch.tensor([20.0, 20.0, 20.0, 2.0]))
    assert not weights.requires_grad


def test_esmm_ns_has_separate_embedding_tables(splits):
    encoder, _, _ = splits
    shared = build_model({"kind": "esmm", **SMALL}, encoder)
    unshared = build_model({"kind": "esmm_ns", **SMALL}, encoder)
    n_shared = sum(p.numel() for p in shared.parameters())
    n_unshared = sum(p.numel() for p in unshared.parameters())
    assert n_unshared - n_shared == shared.embedding.table.weight.numel()
    assert unshared.cvr_embedding is not unshared.embedding
