"""The trainer: Adam with the paper's settings, sparse embedding updates, early stopping on a
validation metric, a checkpoint after every epoch and exact resumption.

Reproducibility: each epoch's shuffling comes from a generator seeded by (seed, epoch), and
the checkpoint holds the weights, both optimizers' states and the early-stopping state, so a
run killed at any point and resumed from its last checkpoint ends with the same weights as a
run that was never interrupted.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from esmm.atomic import atomic_path
from esmm.config import Config, ModelSettings, TrainSettings
from esmm.data.encode import EncodedFeatures, EncodedSplit, FeatureEncoder
from esmm.data.table import DataError
from esmm.metrics import evaluate_predictions
from esmm.progress import progress_bar

if TYPE_CHECKING:
    from esmm.distributed import DataParallel

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "last.pt"
LOWER_IS_BETTER = {"val_loss"}
NO_OWN_PCTR = {"base", "aman", "oversampling", "unbias"}


class TrainingDiverged(RuntimeError):
    """The loss stopped being a finite number; training cannot go on."""


class CheckpointMismatch(ValueError):
    """The checkpoint to resume from belongs to a run with other data, model or settings."""


@dataclass
class EpochResult:
    epoch: int  # 1-based
    train_loss: float
    val_metrics: dict[str, float]
    seconds: float
    samples_per_second: float


@dataclass
class TrainingResult:
    history: list[EpochResult] = field(default_factory=list)
    best_epoch: int = 0
    best_value: float = float("nan")
    monitor: str = ""
    stopped_early: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


EpochCallback = Callable[[EpochResult], None]


def build_optimizers(model: nn.Module, settings: TrainSettings) -> list[torch.optim.Optimizer]:
    """SparseAdam for sparse-gradient embeddings (cost per step proportional to the rows a
    batch touched, not to the vocabulary), Adam for everything else; same betas and eps."""
    sparse_params, dense_params = [], []
    for module in model.modules():
        if isinstance(module, nn.Embedding) and module.sparse:
            sparse_params.append(module.weight)
    sparse_ids = {id(p) for p in sparse_params}
    dense_params = [p for p in model.parameters() if id(p) not in sparse_ids]
    kwargs = {"lr": settings.learning_rate, "betas": settings.adam_betas, "eps": settings.adam_eps}
    optimizers: list[torch.optim.Optimizer] = []
    if sparse_params:
        optimizers.append(torch.optim.SparseAdam(sparse_params, **kwargs))
    if dense_params:
        optimizers.append(torch.optim.Adam(dense_params, **kwargs))
    return optimizers


PRECISIONS = ("float32", "bfloat16")  # of predict(); float32 everywhere but in scoring


@torch.no_grad()
def predict(
    model: nn.Module,
    features: EncodedFeatures,
    batch_size: int = 65536,
    precision: str = "float32",
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """pCTR and pCVR for every row, scored in contiguous slices in eval mode; None for an
    output the model does not have (BASE has no pCTR, the CTR network no pCVR).

    ``precision="bfloat16"`` is for scoring only: the forward pass runs under bfloat16
    autocast, about 2.5 times float32's speed on a CPU with AVX512-BF16, and the logits are
    cast back to float32 before the sigmoid; pCVR moves by about 1e-3 at most (measured in
    benchmarks/RESULTS.md, section 2). Where the CPU lacks bfloat16 it scores in float32 and
    logs why. Validation during training and the evaluation metrics use float32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    bfloat16 = precision == "bfloat16" and _bfloat16_available()
    was_training = model.training
    model.eval()
    pctr, pcvr = [], []
    for start in range(0, len(features), batch_size):
        batch = features.slice(start, min(start + batch_size, len(features)))
        if bfloat16:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                output = model(batch)
            output = _float32_logits(output)
        else:
            output = model(batch)
        pctr.append(output.pctr)
        pcvr.append(output.pcvr)
    model.train(was_training)
    return _concat(pctr), _concat(pcvr)


@functools.cache
def bfloat16_matmul_supported() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX-BF16 in Linux's
    /proc/cpuinfo); elsewhere bfloat16 autocast is emulated and slower than float32."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


@functools.cache
def _bfloat16_available() -> bool:
    """bfloat16_matmul_supported(), with the fallback logged once per process."""
    if bfloat16_matmul_supported():
        return True
    log.warning("no bfloat16 matrix multiply on this CPU (avx512_bf16, amx_bf16): float32 scoring")
    return False


def _float32_logits(output):
    """A model output (a dataclass of logits) with its tensors cast to float32, so that the
    probabilities derived from it are computed in float32."""
    tensors = {
        f.name: value.float()
        for f in dataclasses.fields(output)
        if isinstance(value := getattr(output, f.name), torch.Tensor)
    }
    return dataclasses.replace(output, **tensors)


def _concat(parts: list[torch.Tensor | None]) -> np.ndarray | None:
    return None if parts[0] is None else torch.cat(parts).numpy()


@torch.no_grad()
def validation_loss(model: nn.Module, split: EncodedSplit, batch_size: int) -> float:
    model.eval()
    total = 0.0
    for start in range(0, len(split), batch_size):
        stop = min(start + batch_size, len(split))
        output = model(split.features.slice(start, stop))
        loss, _ = model.loss(output, split.click[start:stop], split.conversion[start:stop])
        total += float(loss) * (stop - start)
    return total / len(split)


def evaluate_split(model: nn.Module, split: EncodedSplit, batch_size: int) -> dict[str, float]:
    pctr, pcvr = predict(model, split.features, batch_size)
    metrics = evaluate_predictions(
        split.click.numpy(), split.conversion.numpy(), pctr, pcvr, split.true_cvr
    )
    metrics["val_loss"] = validation_loss(model, split, batch_size)
    return metrics


def train_model(
    model: nn.Module,
    train: EncodedSplit,
    val: EncodedSplit,
    settings: TrainSettings,
    *,
    seed: int,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    callbacks: list[EpochCallback] | None = None,
    progress: bool = True,
    signature: str = "",
    parallel: DataParallel | None = None,
) -> TrainingResult:
    """Train ``model`` in place; on return it holds the weights of the best validation epoch.

    ``signature`` identifies the data, model and settings; resuming from a checkpoint written
    under another signature is refused rather than silently mixing two runs. ``parallel``
    makes this process one rank of data-parallel training (esmm.distributed): it trains on
    its share of each batch, takes rank 0's validation metrics, and only rank 0 writes
    checkpoints; callbacks run on every rank."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    optimizers = build_optimizers(model, settings)
    monitor = settings.monitor
    sign = -1.0 if monitor in LOWER_IS_BETTER else 1.0
    result = TrainingResult(monitor=monitor)
    best_state = copy.deepcopy(model.state_dict())
    stale_epochs = 0
    start_epoch = 0
    checkpoint_path = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir else None

    if resume and checkpoint_path is not None and checkpoint_path.exists():
        state = torch.load(checkpoint_path, weights_only=False)
        if state.get("signature", "") != signature:
            raise CheckpointMismatch(
                f"{checkpoint_path} was written by a run with other data, model or settings "
                f"(signature {state.get('signature')!r}, this run {signature!r}); "
                "train without --resume or use another output_dir"
            )
        model.load_state_dict(state["model"])
        for optimizer, optimizer_state in zip(optimizers, state["optimizers"], strict=True):
            optimizer.load_state_dict(optimizer_state)
        best_state = state["best_model"]
        stale_epochs = state["stale_epochs"]
        start_epoch = state["epochs_done"]
        result = TrainingResult(
            **{**state["result"], "history": [EpochResult(**h) for h in state["result"]["history"]]}
        )
        log.info("resuming from %s after epoch %d", checkpoint_path, start_epoch)
        if result.stopped_early or start_epoch >= settings.epochs:  # nothing left to train
            model.load_state_dict(best_state)
            return result
    elif resume:
        log.info("no checkpoint to resume from in %s; starting fresh", checkpoint_dir)

    rows = _training_rows(model, train, seed)
    n_rows = len(train) if rows is None else rows.numel()
    forward = model if parallel is None else parallel.wrap(model)
    evaluate = evaluate_split if parallel is None else parallel.evaluate
    writes_checkpoints = checkpoint_path is not None and (parallel is None or parallel.is_main)
    for epoch in range(start_epoch, settings.epochs):
        started = time.perf_counter()
        train_loss = _run_epoch(
            model, forward, optimizers, train, rows, settings, seed, epoch, progress, parallel
        )
        seconds = time.perf_counter() - started
        val_metrics = evaluate(model, val, settings.eval_batch_size)
        epoch_result = EpochResult(epoch + 1, train_loss, val_metrics, seconds, n_rows / seconds)
        result.history.append(epoch_result)

        value = val_metrics[monitor]
        if result.best_epoch == 0 or (
            math.isfinite(value) and sign * value > sign * result.best_value
        ):
            result.best_epoch, result.best_value = epoch + 1, value
            best_state = copy.deepcopy(model.state_dict())
            stale_epochs = 0
        else:
            stale_epochs += 1
        result.stopped_early = stale_epochs >= settings.patience
        headline = "  ".join(
            f"{name} {val_metrics[name]:.4f}"
            for name in ("cvr_auc_clicked", "ctcvr_auc", "ctr_auc")
            if name in val_metrics and name != monitor
        )
        log.info(
            "epoch %d/%d  loss %.5f  val %s %.4f  %s  %.0f samples/s%s",
            epoch + 1,
            settings.epochs,
            train_loss,
            monitor,
            value,
            headline,
            epoch_result.samples_per_second,
            "  (best)" if result.best_epoch == epoch + 1 else "",
        )
        if writes_checkpoints:
            _save_checkpoint(
                checkpoint_path,
                {
                    "model": model.state_dict(),
                    "optimizers": [o.state_dict() for o in optimizers],
                    "best_model": best_state,
                    "stale_epochs": stale_epochs,
                    "epochs_done": epoch + 1,
                    "result": result.to_dict(),
                    "signature": signature,
                },
            )
        for callback in callbacks or []:
            callback(epoch_result)
        if result.stopped_early:
            log.info("early stop: %s has not improved for %d epochs", monitor, stale_epochs)
            break
    model.load_state_dict(best_state)
    return result


def _training_rows(model: nn.Module, train: EncodedSplit, seed: int) -> torch.Tensor | None:
    """The rows a model trains on, for models that choose them (BASE: clicked impressions;
    AMAN, OVERSAMPLING, UNBIAS: their samples); None means every row. Drawn from the seed
    alone, so a resumed run trains on the same rows."""
    choose = getattr(model, "training_rows", None)
    if choose is None:
        return None
    rows = choose(train, torch.Generator().manual_seed(seed * 1_000_003 - 1))
    if rows.numel() == 0:
        raise DataError(f"{type(model).__name__} selected no training rows (no clicks?)")
    log.info("%s trains on %d of %d rows", type(model).__name__, rows.numel(), len(train))
    return rows


def _run_epoch(
    model: nn.Module,
    forward: nn.Module,
    optimizers: list[torch.optim.Optimizer],
    train: EncodedSplit,
    rows: torch.Tensor | None,
    settings: TrainSettings,
    seed: int,
    epoch: int,
    progress: bool,
    parallel: DataParallel | None,
) -> float:
    """One pass over the epoch's permutation; ``forward`` is ``model`` itself or, in
    data-parallel training, its gradient-averaging wrapper, and ``parallel`` cuts this rank's
    share out of the permutation."""
    model.train()
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(train) if rows is None else rows.numel(), generator=generator)
    if rows is not None:
        order = rows[order]
    batch_size = settings.batch_size
    if parallel is not None:
        order, batch_size = parallel.epoch_rows(order, batch_size)
    n_rows = order.numel()
    n_batches = math.ceil(n_rows / batch_size)
    loss_sum = torch.zeros((), dtype=torch.float64)
    with progress_bar("samples", enabled=progress) as bar:
        task = bar.add_task(f"epoch {epoch + 1}/{settings.epochs}", total=n_rows)
        for step in range(n_batches):
            batch = order[step * batch_size : (step + 1) * batch_size]
            output = forward(train.features.take(batch))
            loss, _ = model.loss(output, train.click[batch], train.conversion[batch])
            if not torch.isfinite(loss):
                raise TrainingDiverged(
                    f"loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}/{n_batches} "
                    f"(learning_rate={settings.learning_rate}); lower train.learning_rate or "
                    "check the input features"
                )
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for optimizer in optimizers:
                optimizer.step()
            loss_sum += loss.detach() * batch.numel()
            if step % 20 == 0 or step == n_batches - 1:
                bar.update(task, completed=min((step + 1) * batch_size, n_rows))
    if parallel is not None:
        return parallel.mean(loss_sum, n_rows)
    return float(loss_sum) / n_rows


def _save_checkpoint(path: Path, state: dict) -> None:
    """torch.save to a temporary file beside ``path``, then rename: a kill never leaves a
    truncated checkpoint under the real name."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def run_signature(config: Config, data_fingerprint: str) -> str:
    """What a checkpoint must match to be resumed: data, seed, model and training settings
    (the epoch budget may grow, so ``epochs`` is left out)."""
    identity = {
        "data": data_fingerprint,
        "seed": config.seed,
        "model": config.model.model_dump(mode="json"),
        "train": config.train.model_dump(mode="json", exclude={"epochs", "threads"}),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def monitor_for(kind: str, requested: str) -> str:
    """The early-stopping metric a model can report: the CTR network only has CTR metrics,
    models without a pCTR of their own (BASE and its variants) only CVR ones."""
    if kind == "ctr":
        return "ctr_auc" if requested != "val_loss" else requested
    if kind in NO_OWN_PCTR and requested in ("ctr_auc", "ctcvr_auc"):
        return "cvr_auc_clicked"
    return requested


def fit(
    config: Config,
    model_settings: ModelSettings,
    encoder: FeatureEncoder,
    train: EncodedSplit,
    val: EncodedSplit,
    *,
    seed: int,
    data_fingerprint: str,
    checkpoint_dir: Path | None,
    resume: bool = False,
    progress: bool = True,
    reference_ctr: nn.Module | None = None,
    callbacks: list[EpochCallback] | None = None,
    parallel: DataParallel | None = None,
) -> tuple[nn.Module, TrainingResult]:
    """Build one model from ``model_settings`` (seeded) and train it with ``config.train``;
    ``callbacks`` see every epoch's result (tuning reports and prunes through them)."""
    from esmm.models import build_model

    torch.manual_seed(seed)
    model = build_model(model_settings.model_dump(), encoder, reference_ctr)
    settings = config.train.model_copy(
        update={"monitor": monitor_for(model_settings.kind, config.train.monitor)}
    )
    identity = config.model_copy(update={"model": model_settings, "train": settings, "seed": seed})
    result = train_model(
        model,
        train,
        val,
        settings,
        seed=seed,
        checkpoint_dir=checkpoint_dir,
        resume=resume,
        callbacks=callbacks,
        progress=progress,
        signature=run_signature(identity, data_fingerprint),
        parallel=parallel,
    )
    return model, result


def train_stage(
    config: Config,
    *,
    resume: bool = False,
    progress: bool = True,
    callbacks: list[EpochCallback] | None = None,
    parallel: DataParallel | None = None,
) -> tuple[nn.Module, TrainingResult]:
    """Stage `train`: build the configured model on the prepared data, train it, and save it
    (weights, spec and encoder) to ``<output_dir>/model``. UNBIAS first trains the reference
    CTR network it samples with. With ``parallel`` (esmm.distributed) only rank 0 saves."""
    from esmm.models import save_trained_model
    from esmm.prepare import load_prepared

    prepared = load_prepared(config)
    encoder = prepared.encoder
    train = encoder.encode_split(prepared.tables["train"])
    val = encoder.encode_split(prepared.tables["val"])
    fingerprint = prepared.manifest["fingerprint"]
    checkpoints = config.output_path / "checkpoints"
    log.info(
        "training %s on %d impressions, validating on %d", config.model.kind, len(train), len(val)
    )
    reference_ctr = None
    if config.model.kind == "unbias":
        log.info("training the reference CTR network that UNBIAS samples with")
        reference_ctr, _ = fit(
            config,
            config.model.model_copy(update={"kind": "ctr"}),
            encoder,
            train,
            val,
            seed=config.seed,
            data_fingerprint=fingerprint,
            checkpoint_dir=checkpoints / "reference_ctr",
            resume=resume,
            progress=progress,
            parallel=parallel,
        )
    model, result = fit(
        config,
        config.model,
        encoder,
        train,
        val,
        seed=config.seed,
        data_fingerprint=fingerprint,
        checkpoint_dir=checkpoints,
        resume=resume,
        progress=progress,
        reference_ctr=reference_ctr,
        callbacks=callbacks,
        parallel=parallel,
    )
    if parallel is not None and not parallel.is_main:
        return model, result
    spec = {
        **config.model.model_dump(mode="json"),
        "best_epoch": result.best_epoch,
        "monitor": result.monitor,
        "best_value": result.best_value,
        "data_fingerprint": fingerprint,
    }
    save_trained_model(model, encoder, spec, config.output_path / "model")
    return model, result
