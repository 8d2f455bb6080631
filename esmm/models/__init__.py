"""Building models from a config and a fitted encoder; saving and loading trained ones."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from esmm.atomic import atomic_folder
from esmm.data.encode import FeatureEncoder
from esmm.data.table import FieldKind
from esmm.models.comparison import Aman, Base, CTRNetwork, Division, Oversampling, Unbias
from esmm.models.escm2 import ESCM2
from esmm.models.esmm import ESMM, FieldEmbedding

MODEL_FILE = "model.pt"
MODEL_SPEC_FILE = "model.json"
ENCODER_FOLDER = "encoder"
MODEL_KINDS = (
    "esmm",
    "esmm_ns",
    "base",
    "aman",
    "oversampling",
    "unbias",
    "division",
    "escm2_ipw",
    "escm2_dr",
    "ctr",
)


def build_embedding(encoder: FeatureEncoder, embedding_dim: int) -> FieldEmbedding:
    schema = encoder.schema
    cardinalities = encoder.cardinalities
    return FieldEmbedding(
        [cardinalities[n] for n in schema.names(FieldKind.SINGLE)],
        [cardinalities[n] for n in schema.names(FieldKind.MULTI)],
        len(schema.names(FieldKind.DENSE)),
        embedding_dim,
    )


def build_model(
    settings: Mapping, encoder: FeatureEncoder, reference_ctr: CTRNetwork | None = None
) -> nn.Module:
    """A freshly initialised model from model settings (``kind``, ``embedding_dim``,
    ``tower_dims`` and the kind's own parameters); seed torch beforehand for reproducible
    weights. ``unbias`` needs the trained ``reference_ctr``; without one (when loading saved
    weights) an untrained network of the same shape stands in."""
    kind = settings["kind"]
    towers = tuple(settings["tower_dims"])

    def embedding() -> FieldEmbedding:
        return build_embedding(encoder, settings["embedding_dim"])

    match kind:
        case "esmm":
            return ESMM(embedding(), towers)
        case "esmm_ns":
            return ESMM(embedding(), towers, cvr_embedding=embedding())
        case "escm2_ipw" | "escm2_dr":
            return ESCM2(
                embedding(),
                towers,
                kind.removeprefix("escm2_"),
                settings["counterfactual_weight"],
                settings["propensity_clip"],
            )
        case "ctr":
            return CTRNetwork(embedding(), towers)
        case "base":
            return Base(embedding(), towers)
        case "aman":
            return Aman(embedding(), towers, settings["negative_rate"])
        case "oversampling":
            return Oversampling(embedding(), towers, settings["oversampling_factor"])
        case "unbias":
            reference = reference_ctr or CTRNetwork(embedding(), towers)
            return Unbias(embedding(), towers, reference)
        case "division":
            return Division(embedding(), embedding(), towers)
    raise ValueError(f"unknown model kind {kind!r}; known: {list(MODEL_KINDS)}")


def save_trained_model(
    model: nn.Module, encoder: FeatureEncoder, spec: dict, folder: str | Path
) -> Path:
    """Write weights, the spec needed to rebuild the model, and the encoder into ``folder``,
    through a temporary folder renamed into place."""
    with atomic_folder(folder) as staging:
        torch.save(model.state_dict(), staging / MODEL_FILE)
        (staging / MODEL_SPEC_FILE).write_text(json.dumps(spec, indent=2))
        encoder.save(staging / ENCODER_FOLDER)
    return Path(folder)


def load_trained_model(folder: str | Path) -> tuple[nn.Module, FeatureEncoder, dict]:
    folder = Path(folder)
    spec_path = folder / MODEL_SPEC_FILE
    if not spec_path.exists():
        raise FileNotFoundError(f"no trained model at {folder} (missing {MODEL_SPEC_FILE})")
    spec = json.loads(spec_path.read_text())
    encoder = FeatureEncoder.load(folder / ENCODER_FOLDER)
    model = build_model(spec, encoder)
    model.load_state_dict(torch.load(folder / MODEL_FILE, weights_only=True))
    model.eval()
    return model, encoder, spec
