"""The ESMM model: loss in log space, field-wise pooling, sparse embedding gradients."""

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F

from esmm.data.encode import FeatureEncoder
from esmm.data.table import TableSchema
from esmm.models import build_model
from esmm.models.esmm import ESMM, FieldEmbedding, TwoTowerOutput, ctcvr_loss, esmm_loss


def reference_loss_float64(ctr_logit, cvr_logit, click, conversion):
    """The paper's loss written naively, in float64: BCE(y, pCTR) + BCE(y*z, pCTR*pCVR)."""
    pctr = torch.sigmoid(ctr_logit.double())
    pctcvr = pctr * torch.sigmoid(cvr_logit.double())
    y, yz = click.double(), (click * conversion).double()
    ctr = -(y * torch.log(pctr) + (1 - y) * torch.log(1 - pctr)).mean()
    ctcvr = -(yz * torch.log(pctcvr) + (1 - yz) * torch.log(1 - pctcvr)).mean()
    return ctr + ctcvr


@pytest.mark.parametrize("ctr_logit", [-50.0, 50.0])
@pytest.mark.parametrize("cvr_logit", [-50.0, 50.0])
@pytest.mark.parametrize("label", [0.0, 1.0])
def test_loss_is_finite_with_saturated_logits(ctr_logit, cvr_logit, label):
    ctr = torch.tensor([ctr_logit], requires_grad=True)
    cvr = torch.tensor([cvr_logit], requires_grad=True)
    click = torch.tensor([label])
    loss, parts = esmm_loss(TwoTowerOutput(ctr, cvr), click, click)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(ctr.grad).all() and torch.isfinite(cvr.grad).all()
    assert all(torch.isfinite(v) for v in parts.values())


def test_loss_matches_float64_reference():
    generator = torch.Generator().manual_seed(0)
    ctr = torch.randn(4096, generator=generator) * 4
    cvr = torch.randn(4096, generator=generator) * 4
    click = (torch.rand(4096, generator=generator) < 0.3).float()
    conversion = click * (torch.rand(4096, generator=generator) < 0.4).float()
    loss, parts = esmm_loss(TwoTowerOutput(ctr, cvr), click, conversion)
    expected = reference_loss_float64(ctr, cvr, click, conversion)
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    assert float(parts["ctr_loss"]) == pytest.approx(
        float(F.binary_cross_entropy_with_logits(ctr.double(), click.double())), rel=1e-5
    )


def test_ctcvr_loss_uses_product_of_probabilities_not_logits():
    ctr, cvr = torch.tensor([0.3]), torch.tensor([-1.2])
    p = torch.sigmoid(ctr) * torch.sigmoid(cvr)
    assert float(ctcvr_loss(ctr, cvr, torch.tensor([1.0]))) == pytest.approx(-float(torch.log(p)))
    assert float(ctcvr_loss(ctr, cvr, torch.tensor([0.0]))) == pytest.approx(
        -float(torch.log1p(-p)), rel=1e-6
    )
    output = TwoTowerOutput(ctr, cvr)
    assert float(output.pctcvr) == pytest.approx(float(output.pctr * output.pcvr))
    assert float(output.pctcvr) != pytest.approx(float(torch.sigmoid(ctr * cvr)))


def _tiny_encoder():
    table = pa.table(
        {
            "user": [1, 2, 3, 1],
            "tags": pa.array([[1, 2], [], [2, 2, 3], [9]], pa.list_(pa.int64())),
            "price": [1.0, 2.0, 3.0, 4.0],
            "click": [1, 0, 1, 0],
            "conversion": [1, 0, 0, 0],
        }
    )
    schema = TableSchema.of({"user": "single", "tags": "multi", "price": "dense"})
    return table, FeatureEncoder.fit(table, schema)


def test_multi_valued_fields_are_sum_pooled():
    table, encoder = _tiny_encoder()
    features = encoder.transform(table)
    embedding = FieldEmbedding(
        [encoder.cardinalities["user"]], [encoder.cardinalities["tags"]], 1, embedding_dim=4
    )
    out = embedding(features)
    assert out.shape == (4, 4 + 4 + 1)
    weight = embedding.table.weight
    tags_start = embedding.multi_row_starts[0]
    tag_rows = [[1, 2], [], [2, 2, 3], [4]]  # vocabulary ids (1-based; 0 = out of vocabulary)
    for row, ids in enumerate(tag_rows):
        expected = weight[[tags_start + i for i in ids]].sum(0) if ids else torch.zeros(4)
        torch.testing.assert_close(out[row, 4:8], expected)
    torch.testing.assert_close(out[:, 0:4], weight[features.single_ids[:, 0].long()])


def test_embedding_gradients_are_sparse_and_touch_only_used_rows():
    table, encoder = _tiny_encoder()
    torch.manual_seed(0)
    model = build_model({"kind": "esmm", "embedding_dim": 4, "tower_dims": [8]}, encoder)
    assert isinstance(model, ESMM)
    features = encoder.transform(table)
    output = model(features)
    loss, _ = model.loss(output, torch.tensor([1.0, 0, 1, 0]), torch.tensor([1.0, 0, 0, 0]))
    loss.backward()
    grad = model.embedding.table.weight.grad
    assert grad.is_sparse
    touched = set(grad.coalesce().indices()[0].tolist())
    assert touched <= set(range(model.embedding.table.num_embeddings))
    assert len(touched) < model.embedding.table.num_embeddings  # OOV rows never used here


def test_towers_are_separate_and_outputs_in_unit_interval():
    table, encoder = _tiny_encoder()
    torch.manual_seed(0)
    model = build_model({"kind": "esmm", "embedding_dim": 4, "tower_dims": [8, 4]}, encoder)
    output = model(encoder.transform(table))
    assert not torch.equal(output.ctr_logit, output.cvr_logit)
    for p in (output.pctr, output.pcvr, output.pctcvr):
        assert ((p >= 0) & (p <= 1)).all()
    assert np.all(output.pctcvr.detach().numpy() <= output.pctr.detach().numpy() + 1e-7)
