"""ESMM: Entire Space Multi-Task Model (Ma et al., SIGIR 2018).

One embedding layer is shared by two towers. The CTR tower gives pCTR = p(click | x), the CVR
tower pCVR = p(conversion | click, x), and their product pCTCVR = p(click, conversion | x).
Training uses every impression:

    L = BCE(click, pCTR) + BCE(click * conversion, pCTR * pCVR)

pCVR is never supervised directly, so it is learned over the entire impression space instead of
the clicked impressions alone (no sample selection bias, far more data). pCVR is what ships.

The CTCVR term is computed in log space: log pCTCVR = logsigmoid(l_ctr) + logsigmoid(l_cvr) and
log(1 - pCTCVR) = log1mexp(log pCTCVR), so the loss stays finite even when both towers saturate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from esmm.data.encode import EncodedFeatures

PAPER_EMBEDDING_DIM = 18
PAPER_TOWER_DIMS = (200, 80)  # hidden widths; the paper's 360-200-80-1 counts input and output


class FieldEmbedding(nn.Module):
    """Embeddings of every id field, concatenated field by field, then the dense features.

    All id fields share one table (each field owns a block of rows), so a batch needs one
    lookup for the single-id fields and one bag lookup per multi-id field, whose ids are
    sum-pooled (field-wise pooling). Gradients are sparse: a step touches only the rows it used,
    so a million-id field trains at nearly the speed of a small one.
    """

    def __init__(
        self,
        single_cardinalities: list[int],
        multi_cardinalities: list[int],
        n_dense: int,
        embedding_dim: int,
        sparse: bool = True,
    ) -> None:
        super().__init__()
        cardinalities = [*single_cardinalities, *multi_cardinalities]
        starts = [0, *torch.tensor(cardinalities, dtype=torch.int64).cumsum(0).tolist()]
        self.sparse = sparse
        self.embedding_dim = embedding_dim
        self.n_single = len(single_cardinalities)
        self.n_multi = len(multi_cardinalities)
        self.n_dense = n_dense
        self.table = nn.Embedding(max(starts[-1], 1), embedding_dim, sparse=sparse)
        nn.init.normal_(self.table.weight, std=0.05)
        self.register_buffer(
            "single_row_starts", torch.tensor(starts[: self.n_single], dtype=torch.int32)
        )
        self.multi_row_starts = starts[self.n_single : self.n_single + self.n_multi]

    @property
    def output_dim(self) -> int:
        return (self.n_single + self.n_multi) * self.embedding_dim + self.n_dense

    def forward(self, features: EncodedFeatures) -> torch.Tensor:
        weight = self.table.weight
        single_rows = features.single_ids + self.single_row_starts
        parts = [F.embedding(single_rows, weight, sparse=self.sparse).flatten(1)]
        for row_start, ids, offsets in zip(
            self.multi_row_starts, features.multi_values, features.multi_offsets, strict=True
        ):
            parts.append(
                F.embedding_bag(
                    ids.to(torch.int64) + row_start,
                    weight,
                    offsets[:-1],
                    mode="sum",
                    sparse=self.sparse,
                )
            )
        if self.n_dense:
            parts.append(features.dense)
        return torch.cat(parts, dim=1)


class Tower(nn.Sequential):
    """A ReLU multi-layer perceptron ending in one logit."""

    def __init__(self, input_dim: int, hidden_dims: tuple[int, ...]) -> None:
        layers: list[nn.Module] = []
        for width in hidden_dims:
            layers += [nn.Linear(input_dim, width), nn.ReLU()]
            input_dim = width
        layers.append(nn.Linear(input_dim, 1))
        super().__init__(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).squeeze(-1)


@dataclass
class TwoTowerOutput:
    """Logits of both towers; probabilities are derived, never stored separately. Models
    without a CTR tower of their own (BASE, AMAN, ...) leave ``ctr_logit`` as None."""

    ctr_logit: torch.Tensor | None
    cvr_logit: torch.Tensor | None

    @property
    def pctr(self) -> torch.Tensor | None:
        return None if self.ctr_logit is None else torch.sigmoid(self.ctr_logit)

    @property
    def pcvr(self) -> torch.Tensor | None:
        return None if self.cvr_logit is None else torch.sigmoid(self.cvr_logit)

    @property
    def pctcvr(self) -> torch.Tensor | None:
        if self.ctr_logit is None or self.cvr_logit is None:
            return None
        return torch.exp(F.logsigmoid(self.ctr_logit) + F.logsigmoid(self.cvr_logit))


def log1mexp(log_p: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(log_p)) for log_p <= 0, accurate everywhere (Maechler, 2012): expm1 near 0,
    log1p(-exp) further out. log_p is kept strictly below 0 so the result stays finite."""
    log_p = log_p.clamp(max=-torch.finfo(log_p.dtype).tiny)
    near_zero = log_p > -math.log(2.0)
    # Each branch gets only inputs it is accurate on, so neither yields inf (or a NaN gradient).
    small = torch.where(near_zero, log_p, -math.log(2.0))
    large = torch.where(near_zero, -math.log(2.0), log_p)
    return torch.where(near_zero, torch.log(-torch.expm1(small)), torch.log1p(-torch.exp(large)))


def ctcvr_loss(
    ctr_logit: torch.Tensor, cvr_logit: torch.Tensor, ctcvr_label: torch.Tensor
) -> torch.Tensor:
    """Mean BCE(click * conversion, pCTR * pCVR), computed from logits in log space."""
    log_pctcvr = F.logsigmoid(ctr_logit) + F.logsigmoid(cvr_logit)
    return -(ctcvr_label * log_pctcvr + (1 - ctcvr_label) * log1mexp(log_pctcvr)).mean()


def esmm_loss(
    output: TwoTowerOutput, click: torch.Tensor, conversion: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L = BCE(y, pCTR) + BCE(y*z, pCTR*pCVR) over all impressions; also the two terms."""
    ctr_term = F.binary_cross_entropy_with_logits(output.ctr_logit, click)
    ctcvr_term = ctcvr_loss(output.ctr_logit, output.cvr_logit, click * conversion)
    return ctr_term + ctcvr_term, {"ctr_loss": ctr_term, "ctcvr_loss": ctcvr_term}


class ESMM(nn.Module):
    """A CTR tower and a CVR tower over shared embeddings; with ``cvr_embedding`` given, each
    tower has its own embedding table instead (ESMM-NS, the paper's no-sharing ablation)."""

    def __init__(
        self,
        embedding: FieldEmbedding,
        tower_dims: tuple[int, ...],
        cvr_embedding: FieldEmbedding | None = None,
    ) -> None:
        super().__init__()
        self.embedding = embedding
        self.cvr_embedding = cvr_embedding
        self.ctr_tower = Tower(embedding.output_dim, tower_dims)
        self.cvr_tower = Tower(embedding.output_dim, tower_dims)

    def forward(self, features: EncodedFeatures) -> TwoTowerOutput:
        ctr_input = self.embedding(features)
        cvr_input = ctr_input if self.cvr_embedding is None else self.cvr_embedding(features)
        return TwoTowerOutput(self.ctr_tower(ctr_input), self.cvr_tower(cvr_input))

    def loss(
        self, output: TwoTowerOutput, click: torch.Tensor, conversion: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return esmm_loss(output, click, conversion)
