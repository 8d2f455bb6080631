"""The paper's comparison models (Ma et al., 2018, section 3.2), with ESMM's embedding and
tower sizes so that only the training scheme differs.

- ``CTRNetwork``: one CTR tower trained on all impressions. The paper scores every model's
  CTCVR AUC with the pCTR of one such independently trained network; UNBIAS uses it too.
- ``Base``: a CVR tower trained on clicked impressions only (label z) — biased by design.
- ``Aman``: BASE plus a sample of unclicked impressions as negatives (rate ``negative_rate``).
- ``Oversampling``: BASE with each converted impression repeated ``factor`` times.
- ``Unbias``: BASE on clicked impressions re-sampled by rejection, pCTR of the reference CTR
  network as the rejection probability: a clicked impression is kept with probability
  proportional to 1/pCTR (capped at 1 for the lowest percentile), which mimics the
  entire-space distribution.
- ``Division``: separate CTR and CTCVR networks on all impressions; pCVR = clip(pCTCVR/pCTR).

Models that pick their training rows define ``training_rows(train, generator)``; the trainer
shuffles those rows (repeats included) each epoch instead of all rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from esmm.data.encode import EncodedFeatures, EncodedSplit
from esmm.models.esmm import FieldEmbedding, Tower, TwoTowerOutput


class CTRNetwork(nn.Module):
    """Embeddings and one CTR tower, trained on all impressions with BCE(click, pCTR)."""

    def __init__(self, embedding: FieldEmbedding, tower_dims: tuple[int, ...]) -> None:
        super().__init__()
        self.embedding = embedding
        self.ctr_tower = Tower(embedding.output_dim, tower_dims)

    def forward(self, features: EncodedFeatures) -> TwoTowerOutput:
        return TwoTowerOutput(self.ctr_tower(self.embedding(features)), None)

    def loss(
        self, output: TwoTowerOutput, click: torch.Tensor, conversion: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ctr_term = F.binary_cross_entropy_with_logits(output.ctr_logit, click)
        return ctr_term, {"ctr_loss": ctr_term}


class Base(nn.Module):
    """A CVR tower trained with BCE(conversion, pCVR) on clicked impressions only."""

    def __init__(self, embedding: FieldEmbedding, tower_dims: tuple[int, ...]) -> None:
        super().__init__()
        self.embedding = embedding
        self.cvr_tower = Tower(embedding.output_dim, tower_dims)

    def forward(self, features: EncodedFeatures) -> TwoTowerOutput:
        return TwoTowerOutput(None, self.cvr_tower(self.embedding(features)))

    def loss(
        self, output: TwoTowerOutput, click: torch.Tensor, conversion: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cvr_term = F.binary_cross_entropy_with_logits(output.cvr_logit, conversion)
        return cvr_term, {"cvr_loss": cvr_term}

    def training_rows(self, train: EncodedSplit, generator: torch.Generator) -> torch.Tensor:
        return torch.nonzero(train.click == 1).squeeze(1)


class Aman(Base):
    """BASE plus unclicked impressions sampled at ``negative_rate`` as negatives (conversion 0)."""

    def __init__(
        self, embedding: FieldEmbedding, tower_dims: tuple[int, ...], negative_rate: float
    ) -> None:
        super().__init__(embedding, tower_dims)
        if not 0 < negative_rate <= 1:
            raise ValueError(f"negative_rate must be in (0, 1], got {negative_rate}")
        self.negative_rate = negative_rate

    def training_rows(self, train: EncodedSplit, generator: torch.Generator) -> torch.Tensor:
        clicked = torch.nonzero(train.click == 1).squeeze(1)
        unclicked = torch.nonzero(train.click == 0).squeeze(1)
        n_negatives = round(self.negative_rate * unclicked.numel())
        chosen = unclicked[torch.randperm(unclicked.numel(), generator=generator)[:n_negatives]]
        return torch.cat([clicked, chosen.sort().values])


class Oversampling(Base):
    """BASE with every converted (clicked) impression used ``factor`` times per epoch."""

    def __init__(self, embedding: FieldEmbedding, tower_dims: tuple[int, ...], factor: int) -> None:
        super().__init__(embedding, tower_dims)
        if factor < 1:
            raise ValueError(f"oversampling factor must be >= 1, got {factor}")
        self.factor = factor

    def training_rows(self, train: EncodedSplit, generator: torch.Generator) -> torch.Tensor:
        clicked = torch.nonzero(train.click == 1).squeeze(1)
        converted = torch.nonzero((train.click == 1) & (train.conversion == 1)).squeeze(1)
        return torch.cat([clicked, converted.repeat(self.factor - 1)])


UNBIAS_FLOOR_QUANTILE = 0.01


def unbias_acceptance(pctr: torch.Tensor) -> torch.Tensor:
    """Rejection sampling with pCTR as the rejection probability: keep a clicked impression
    with probability proportional to 1/pCTR. Scaled so clicks at the 1st percentile of pCTR
    are always kept (those below it too, capped at 1): scaling by the single smallest pCTR
    would let one outlier reject almost every click."""
    floor = torch.quantile(pctr.double(), UNBIAS_FLOOR_QUANTILE).to(pctr.dtype)
    return (floor / pctr).clamp(max=1.0)


class Unbias(Base):
    """BASE on clicked impressions re-sampled by rejection on the reference network's pCTR."""

    def __init__(
        self, embedding: FieldEmbedding, tower_dims: tuple[int, ...], reference_ctr: CTRNetwork
    ) -> None:
        super().__init__(embedding, tower_dims)
        self.reference_ctr = reference_ctr.requires_grad_(False)

    @torch.no_grad()
    def training_rows(self, train: EncodedSplit, generator: torch.Generator) -> torch.Tensor:
        clicked = torch.nonzero(train.click == 1).squeeze(1)
        self.reference_ctr.eval()
        pctr = self.reference_ctr(train.features.take(clicked)).pctr
        keep = torch.rand(clicked.numel(), generator=generator) < unbias_acceptance(pctr)
        return clicked[keep]


@dataclass
class DivisionOutput:
    ctr_logit: torch.Tensor
    ctcvr_logit: torch.Tensor

    @property
    def pctr(self) -> torch.Tensor:
        return torch.sigmoid(self.ctr_logit)

    @property
    def pctcvr(self) -> torch.Tensor:
        return torch.sigmoid(self.ctcvr_logit)

    @property
    def pcvr(self) -> torch.Tensor:
        """pCTCVR / pCTR, clipped to [0, 1] (the ratio of two separate models can exceed 1)."""
        ratio = torch.exp(F.logsigmoid(self.ctcvr_logit) - F.logsigmoid(self.ctr_logit))
        return ratio.clamp(0.0, 1.0)


class Division(nn.Module):
    """Separately parametrised CTR and CTCVR networks (no shared weights) trained on all
    impressions; their losses are independent, so training them together equals training
    them apart."""

    def __init__(
        self,
        ctr_embedding: FieldEmbedding,
        ctcvr_embedding: FieldEmbedding,
        tower_dims: tuple[int, ...],
    ) -> None:
        super().__init__()
        self.ctr_embedding = ctr_embedding
        self.ctcvr_embedding = ctcvr_embedding
        self.ctr_tower = Tower(ctr_embedding.output_dim, tower_dims)
        self.ctcvr_tower = Tower(ctcvr_embedding.output_dim, tower_dims)

    def forward(self, features: EncodedFeatures) -> DivisionOutput:
        return DivisionOutput(
            self.ctr_tower(self.ctr_embedding(features)),
            self.ctcvr_tower(self.ctcvr_embedding(features)),
        )

    def loss(
        self, output: DivisionOutput, click: torch.Tensor, conversion: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ctr_term = F.binary_cross_entropy_with_logits(output.ctr_logit, click)
        ctcvr_term = F.binary_cross_entropy_with_logits(output.ctcvr_logit, click * conversion)
        return ctr_term + ctcvr_term, {"ctr_loss": ctr_term, "ctcvr_loss": ctcvr_term}
