"""Building models from a config and a fitted encoder; saving and loading trained ones."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from esmm.data.encode import FeatureEncoder
from esmm.data.table import FieldKind
from esmm.models.esmm import ESMM, FieldEmbedding

MODEL_FILE = "model.pt"
MODEL_SPEC_FILE = "model.json"
ENCODER_FOLDER = "encoder"


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
    kind: str, encoder: FeatureEncoder, embedding_dim: int, tower_dims: list[int] | tuple[int, ...]
) -> nn.Module:
    """A freshly initialised model of ``kind``; seed torch beforehand for reproducible weights."""
    if kind == "esmm":
        return ESMM(build_embedding(encoder, embedding_dim), tuple(tower_dims))
    raise ValueError(f"unknown model kind {kind!r}; known: ['esmm']")


def save_trained_model(
    model: nn.Module, encoder: FeatureEncoder, spec: dict, folder: str | Path
) -> Path:
    """Write weights, the spec needed to rebuild the model, and the encoder into ``folder``,
    through a temporary folder renamed into place."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        torch.save(model.state_dict(), staging / MODEL_FILE)
        (staging / MODEL_SPEC_FILE).write_text(json.dumps(spec, indent=2))
        encoder.save(staging / ENCODER_FOLDER)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def load_trained_model(folder: str | Path) -> tuple[nn.Module, FeatureEncoder, dict]:
    folder = Path(folder)
    spec_path = folder / MODEL_SPEC_FILE
    if not spec_path.exists():
        raise FileNotFoundError(f"no trained model at {folder} (missing {MODEL_SPEC_FILE})")
    spec = json.loads(spec_path.read_text())
    encoder = FeatureEncoder.load(folder / ENCODER_FOLDER)
    model = build_model(spec["kind"], encoder, spec["embedding_dim"], spec["tower_dims"])
    model.load_state_dict(torch.load(folder / MODEL_FILE, weights_only=True))
    model.eval()
    return model, encoder, spec
