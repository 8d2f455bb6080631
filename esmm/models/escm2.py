"""ESCM2 (Wang et al., SIGIR 2022): ESMM plus a counterfactual CVR risk on clicked impressions.

ESMM's pCVR = pCTCVR / pCTR estimates p(conversion | click, x) — the same quantity click-only
training targets — so where clicking and converting share causes the features do not show,
it stays biased on unclicked impressions. ESCM2 adds an estimate of the CVR risk over the
entire space, built from clicked impressions re-weighted by the CTR tower's propensity:

- ``ipw``: R = mean over all impressions of click * BCE(z, pCVR) / p̂
- ``dr`` (doubly robust): an imputation tower predicts each impression's CVR error ê;
  R = mean(ê + click * (e - ê) / p̂) + mean(click * (e - ê)² / p̂), the second term training the
  imputation tower.

p̂ is pCTR with its gradient stopped, clipped below at ``propensity_clip`` so a few tiny
propensities cannot dominate. L = L_ESMM + ``counterfactual_weight`` · R.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from esmm.data.encode import EncodedFeatures
from esmm.models.esmm import ESMM, FieldEmbedding, Tower, TwoTowerOutput, esmm_loss


def propensity_weights(pctr: torch.Tensor, clip: float) -> torch.Tensor:
    """Inverse propensities 1 / max(pCTR, clip), without gradient into the CTR tower."""
    return 1.0 / pctr.detach().clamp(min=clip)


@dataclass
class ESCM2Output(TwoTowerOutput):
    imputed_error: torch.Tensor | None = None


class ESCM2(ESMM):
    def __init__(
        self,
        embedding: FieldEmbedding,
        tower_dims: tuple[int, ...],
        estimator: str,
        counterfactual_weight: float,
        propensity_clip: float,
    ) -> None:
        super().__init__(embedding, tower_dims)
        if estimator not in ("ipw", "dr"):
            raise ValueError(f"ESCM2 estimator must be 'ipw' or 'dr', got {estimator!r}")
        self.estimator = estimator
        self.counterfactual_weight = counterfactual_weight
        self.propensity_clip = propensity_clip
        self.imputation_tower = (
            Tower(embedding.output_dim, tower_dims) if estimator == "dr" else None
        )

    def forward(self, features: EncodedFeatures) -> ESCM2Output:
        shared = self.embedding(features)
        imputed = None if self.imputation_tower is None else self.imputation_tower(shared)
        return ESCM2Output(self.ctr_tower(shared), self.cvr_tower(shared), imputed)

    def loss(
        self, output: ESCM2Output, click: torch.Tensor, conversion: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss, parts = esmm_loss(output, click, conversion)
        weights = propensity_weights(output.pctr, self.propensity_clip)
        error = F.binary_cross_entropy_with_logits(output.cvr_logit, conversion, reduction="none")
        if self.imputation_tower is None:
            risk = (click * error * weights).mean()
        else:
            residual = error - output.imputed_error
            risk = (output.imputed_error + click * residual * weights).mean()
            risk = risk + (click * residual.pow(2) * weights).mean()
        parts["counterfactual_cvr_risk"] = risk
        return loss + self.counterfactual_weight * risk, parts
