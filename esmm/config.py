"""Typed configuration: YAML files in conf/, validated on load, overridable from the CLI.

Unknown keys and bad values are rejected with a message that names the file, the dotted key
and the offending value. Overrides use the same dotted keys (``train.epochs=3``) and are
validated exactly like the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from esmm.models import MODEL_KINDS
from esmm.models.esmm import PAPER_EMBEDDING_DIM, PAPER_TOWER_DIMS


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names key and value."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SimulatorSettings(_Section):
    preset: str = "default"
    rows: Annotated[int, Field(gt=0)] = 1_000_000
    days: Annotated[int, Field(gt=1)] = 8
    seed: int = 0


class DataSettings(_Section):
    """Where impressions come from.

    - ``simulator``: the built-in simulator (``simulator`` section); written to ``path``.
    - ``aliccp_raw``: Tianchi files; ``files`` maps split -> [skeleton, common_features].
    - ``paddlerec``: PaddleRec's ``sample_id,click,conversion,field:id,...`` text; ``files``
      maps split -> [path].
    - ``table``: CSV or Parquet; either ``path`` (one table with a ``day`` column) or
      ``files`` mapping split -> [path]; ``columns`` renames file columns to canonical names and
      ``fields`` gives the feature schema (glob patterns allowed: ``"numerical_*": dense``).
    """

    source: Literal["simulator", "aliccp_raw", "paddlerec", "table"] = "simulator"
    path: str | None = None
    files: dict[Literal["train", "val", "test"], list[str]] | None = None
    columns: dict[str, str] = Field(default_factory=dict)
    fields: dict[str, Literal["single", "multi", "dense"]] = Field(default_factory=dict)
    allow_missing: list[str] = Field(default_factory=list)
    # Keep only the most recent N days (daily partitions) before splitting; None keeps all.
    window_days: Annotated[int, Field(ge=2)] | None = None
    conversion_without_click: Literal["drop", "clear", "error"] = "drop"
    simulator: SimulatorSettings = Field(default_factory=SimulatorSettings)

    @model_validator(mode="after")
    def _source_needs_its_inputs(self) -> DataSettings:
        if self.source in ("aliccp_raw", "paddlerec") and not self.files:
            raise ValueError(f"data.source={self.source!r} needs data.files (split -> paths)")
        if self.source == "table":
            if not (self.path or self.files):
                raise ValueError("data.source='table' needs data.path or data.files")
            if not self.fields:
                raise ValueError("data.source='table' needs data.fields (column -> kind)")
        if self.files and "train" not in self.files:
            raise ValueError(f"data.files needs a 'train' entry, got {sorted(self.files)}")
        return self


class SplitSettings(_Section):
    """Time split. By ``day``: the last ``test_fraction`` of the days are test (the paper: 1/2),
    the last ``val_days`` before them validation, the rest training. By file: the files given
    per split; without a val file the last ``val_fraction`` of the training rows (in file, i.e.
    time, order) are held out."""

    test_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.5
    val_days: Annotated[int, Field(ge=1)] = 1
    val_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.1


class EncodeSettings(_Section):
    min_count: Annotated[int, Field(ge=1)] = 2


ModelKind = Literal[MODEL_KINDS]  # type: ignore[valid-type]


class ModelSettings(_Section):
    """The model and its size; every kind uses the same embedding and tower sizes.

    Kinds: ``esmm``; the paper's comparison ``base``, ``aman``, ``oversampling``, ``unbias``,
    ``division``, ``esmm_ns``; ESCM2's ``escm2_ipw`` and ``escm2_dr``; ``ctr`` (a lone CTR
    network, the paper's shared reference for CTCVR AUC)."""

    kind: ModelKind = "esmm"
    embedding_dim: Annotated[int, Field(ge=1, le=1024)] = PAPER_EMBEDDING_DIM
    tower_dims: Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=1)] = Field(
        default_factory=lambda: list(PAPER_TOWER_DIMS)
    )
    negative_rate: Annotated[float, Field(gt=0, le=1)] = 0.1  # aman: share of unclicked kept
    oversampling_factor: Annotated[int, Field(ge=1)] = 5  # oversampling: uses per conversion
    counterfactual_weight: Annotated[float, Field(ge=0)] = 1.0  # escm2: weight of the CVR risk
    propensity_clip: Annotated[float, Field(gt=0, le=1)] = 0.05  # escm2: lower bound on pCTR


class TrainSettings(_Section):
    batch_size: Annotated[int, Field(ge=1)] = 1024
    epochs: Annotated[int, Field(ge=1)] = 5
    learning_rate: Annotated[float, Field(gt=0)] = 1e-3
    adam_betas: tuple[float, float] = (0.9, 0.999)  # the paper's Adam settings
    adam_eps: Annotated[float, Field(gt=0)] = 1e-8
    monitor: Literal["cvr_auc_clicked", "ctcvr_auc", "ctr_auc", "val_loss"] = "cvr_auc_clicked"
    patience: Annotated[int, Field(ge=1)] = 2
    eval_batch_size: Annotated[int, Field(ge=1)] = 65536
    threads: Annotated[int, Field(ge=0)] = 0  # 0: torch's default


PAPER_COMPARISON = ["base", "aman", "oversampling", "unbias", "division", "esmm_ns", "esmm"]


class CompareSettings(_Section):
    """`esmm compare`: which models, how many seeds, the paper's searches and the sampling
    rates of the CVR-AUC-against-training-size figure (1.0 reuses the full runs)."""

    models: Annotated[list[ModelKind], Field(min_length=1)] = Field(
        default_factory=lambda: list(PAPER_COMPARISON)
    )
    seeds: Annotated[list[int], Field(min_length=1)] = Field(
        default_factory=lambda: [0, 1, 2, 3, 4]
    )
    search: bool = False
    aman_rates: list[Annotated[float, Field(gt=0, le=1)]] = Field(
        default_factory=lambda: [0.1, 0.2, 0.5, 1.0]
    )
    oversampling_factors: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: [2, 3, 5, 10]
    )
    sampling_rates: list[Annotated[float, Field(gt=0, le=1)]] = Field(
        default_factory=lambda: [0.1, 0.2, 0.5, 1.0]
    )
    output_dir: str | None = None  # default: <output_dir>/compare

    @model_validator(mode="after")
    def _no_reference_network_in_the_list(self) -> CompareSettings:
        if "ctr" in self.models:
            raise ValueError(
                "compare.models: 'ctr' is the shared reference network, always trained"
            )
        return self


class ValidateSettings(_Section):
    """`esmm validate` (section ``validation``): the Great Expectations suite's bounds.
    Required columns, types, labels in {0,1}, conversion <= click, non-negative ids and nulls
    (only in ``data.allow_missing`` fields) come from the schema; the bounds from here."""

    min_rows: Annotated[int, Field(ge=1)] = 1000
    ctr_range: tuple[float, float] = (0.005, 0.5)  # share of impressions clicked
    cvr_per_click_range: tuple[float, float] = (0.001, 0.6)  # share of clicks converted
    days: list[int] | None = None  # the day values expected; None: any >= 0 (simulator: 0..days-1)
    min_days: Annotated[int, Field(ge=1)] = 2  # a time split needs at least two days
    data_docs: bool = True  # also build GX Data Docs (HTML) beside the JSON report

    @model_validator(mode="after")
    def _ranges_are_ordered(self) -> ValidateSettings:
        for key in ("ctr_range", "cvr_per_click_range"):
            low, high = getattr(self, key)
            if not 0 <= low < high <= 1:
                raise ValueError(f"validate.{key}: need 0 <= low < high <= 1, got {[low, high]}")
        return self


class SearchSpace(_Section):
    """What Optuna searches. The paper's setting (embedding 18, towers 200-80) lies inside."""

    embedding_dim: Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=1)] = Field(
        default_factory=lambda: [8, 12, 18, 24, 32]
    )
    tower_layers: tuple[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]] = (1, 3)
    tower_width: Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=1)] = Field(
        default_factory=lambda: [32, 64, 80, 128, 200, 256]
    )
    learning_rate: tuple[float, float] | None = None  # log-uniform range; None: train's value
    batch_size: list[Annotated[int, Field(ge=1)]] | None = None  # None: train's value


class TuneSettings(_Section):
    """`esmm tune`: an Optuna study persisted at ``storage``; rerunning resumes it."""

    n_trials: Annotated[int, Field(ge=1)] = 8  # finished trials the study should hold
    epochs: Annotated[int, Field(ge=1)] = 2  # per trial (pruning may stop a trial earlier)
    metric: Literal["cvr_auc_clicked", "ctcvr_auc", "ctr_auc", "val_loss"] = "cvr_auc_clicked"
    pruner: Literal["median", "hyperband", "none"] = "median"
    study_name: str | None = None  # default: the config's name
    storage: str | None = None  # default: sqlite:///<output_dir>/optuna.db
    timeout_seconds: Annotated[float, Field(gt=0)] | None = None
    # A running trial records a heartbeat this often; one silent for grace_seconds belonged to
    # a killed worker and becomes FAIL (retried once). Tests shorten both.
    heartbeat_seconds: Annotated[int, Field(ge=1)] = 10
    grace_seconds: Annotated[int, Field(ge=1)] = 30
    space: SearchSpace = Field(default_factory=SearchSpace)

    @model_validator(mode="after")
    def _grace_outlasts_the_heartbeat(self) -> TuneSettings:
        if self.grace_seconds <= self.heartbeat_seconds:
            raise ValueError(
                f"tune.grace_seconds ({self.grace_seconds}) must exceed tune.heartbeat_seconds "
                f"({self.heartbeat_seconds}), or live trials would be failed as stale"
            )
        return self


class TrackingSettings(_Section):
    """MLflow: where runs and registered models live. Default: a SQLite file and an artifact
    folder under ``runs/mlflow`` (shared by every config, so runs can be compared)."""

    tracking_uri: str | None = None  # default: sqlite:///runs/mlflow/mlflow.db
    artifact_location: str | None = None  # default: runs/mlflow/artifacts (local stores only)
    experiment: str = "esmm"
    registered_model: str = "esmm-cvr"


class PromoteSettings(_Section):
    """Registry promotion: the new version becomes ``@champion`` only if ``metric`` (scored now,
    on the current test split, for both models) improves by ``min_improvement`` and the
    guardrails pass; otherwise it gets ``@challenger``."""

    metric: Literal["cvr_auc_clicked", "ctcvr_auc", "ctr_auc", "cvr_auc_all"] = "cvr_auc_clicked"
    min_improvement: Annotated[float, Field(ge=0)] = 0.001
    calibration_metric: Literal[
        "ctcvr_calibration", "ctr_calibration", "cvr_calibration_clicked"
    ] = "ctcvr_calibration"
    calibration_range: tuple[float, float] = (0.5, 2.0)  # mean predicted / observed


class Config(_Section):
    name: str = "default"
    seed: int = 0
    output_dir: str = "runs/default"
    data: DataSettings = Field(default_factory=DataSettings)
    split: SplitSettings = Field(default_factory=SplitSettings)
    encode: EncodeSettings = Field(default_factory=EncodeSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    compare: CompareSettings = Field(default_factory=CompareSettings)
    validation: ValidateSettings = Field(default_factory=ValidateSettings)
    tune: TuneSettings = Field(default_factory=TuneSettings)
    tracking: TrackingSettings = Field(default_factory=TrackingSettings)
    promote: PromoteSettings = Field(default_factory=PromoteSettings)

    @property
    def output_path(self) -> Path:
        return Path(self.output_dir)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read ``path`` (defaults only if None), apply ``key=value`` overrides, validate."""
    source = str(path) if path else "<defaults>"
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML: {error}") from error
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping, got {type(raw).__name__}")
    for override in overrides or []:
        key, sep, value = override.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {override!r} must look like key=value (train.epochs=3)")
        _set_dotted(raw, key.strip(), yaml.safe_load(value), source)
        source = f"{source} (with overrides)"
    try:
        return Config.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_describe(error, source)) from None


def _set_dotted(raw: dict, key: str, value: Any, source: str) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: cannot set {key!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def _describe(error: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration"]
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"])
        if not key:  # a check across several keys: its message names them
            lines.append(f"  - {item['msg'].removeprefix('Value error, ')}")
        elif item["type"] == "extra_forbidden":
            lines.append(f"  - unknown key '{key}' (value {item['input']!r})")
        else:
            lines.append(f"  - key '{key}': value {item.get('input')!r}: {item['msg']}")
    return "\n".join(lines)


def dump_config(config: Config) -> str:
    """The resolved configuration as YAML (saved beside every output)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
