"""Data-parallel training with torch.distributed: the `train` stage as one rank of a torchrun job.

    esmm prepare -c CONFIG
    torchrun --nproc-per-node N -m esmm.distributed -c CONFIG [--set key=value ...] [--resume]

Every rank loads the whole prepared data and builds the same seeded model. Each epoch all ranks
draw the single-process trainer's (seed, epoch) permutation; every global batch of
``train.batch_size`` rows is cut into ``world_size`` equal pieces and rank r trains on piece r,
so one step's pieces together are exactly the single-process batch. DistributedDataParallel
averages the gradients after each backward pass, the shared embedding table's sparse gradients
included (gloo all-reduces sparse tensors: it gathers every rank's indices and values and sums
them), so each step is the single process's step up to the order of float sums.

Rank 0 alone validates, logs, and writes checkpoints and the model folder; it broadcasts each
epoch's validation metrics, so every rank takes the same early-stopping decision and ends
holding the same best weights. The backend is gloo: the trainer keeps the model and its batches
on CPU (EncodedFeatures.take gathers rows with CPU tensors), and NCCL only moves CUDA tensors.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from esmm.config import ConfigError, load_config
from esmm.data.encode import EncodedSplit
from esmm.data.table import DataError
from esmm.train import CheckpointMismatch, TrainingDiverged, evaluate_split, train_stage

log = logging.getLogger("esmm.distributed")

BACKEND = "gloo"


def check_batch_size(batch_size: int, world_size: int) -> None:
    """The global batch must split into equal per-rank batches, or the averaged gradient
    would weight the ranks' rows unequally."""
    if batch_size % world_size:
        raise ConfigError(
            f"train.batch_size={batch_size} cannot be split evenly across {world_size} "
            f"processes: use a multiple of {world_size} (each process trains on "
            f"batch_size / {world_size} rows per step, so the global batch stays batch_size)"
        )


def rank_rows(order: torch.Tensor, batch_size: int, rank: int, world_size: int) -> torch.Tensor:
    """Rank ``rank``'s rows of an epoch, in training order: piece ``rank`` of every global batch
    of ``batch_size`` rows cut into ``world_size`` equal pieces. The last ``len(order) %
    world_size`` rows of the permutation are left out, so the final, shorter batch splits
    evenly too; they differ from epoch to epoch, as the permutation does."""
    usable = order[: order.numel() - order.numel() % world_size]
    n_full = usable.numel() - usable.numel() % batch_size
    full = usable[:n_full].view(-1, world_size, batch_size // world_size)[:, rank]
    tail = usable[n_full:].view(world_size, -1)[rank]
    return torch.cat([full.reshape(-1), tail])


class DataParallel:
    """This process's part in data-parallel training, called by esmm.train at the few points
    where a rank differs from a single process (see train_model's ``parallel``)."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank = rank
        self.world_size = world_size
        self._wrappers: list[DistributedDataParallel] = []

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` behind DistributedDataParallel, which copies rank 0's weights to every
        rank once and averages the gradients in every backward pass. Its buffers are constants
        (embedding row offsets), so they are not re-sent before each forward pass."""
        wrapper = DistributedDataParallel(model, forward_sync_buffers=False)
        self._wrappers.append(wrapper)
        return wrapper

    def epoch_rows(self, order: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, int]:
        """This rank's rows of the epoch permutation ``order`` and its per-step batch size."""
        rows = rank_rows(order, batch_size, self.rank, self.world_size)
        return rows, batch_size // self.world_size

    def mean(self, total: torch.Tensor, count: int) -> float:
        """The mean over all ranks of a per-rank ``total`` over ``count`` rows."""
        summed = torch.stack([total.to(torch.float64), torch.tensor(count, dtype=torch.float64)])
        dist.all_reduce(summed)
        return float(summed[0] / summed[1])

    def evaluate(self, model: nn.Module, split: EncodedSplit, batch_size: int) -> dict[str, float]:
        """Rank 0's validation metrics, on every rank: the others wait instead of evaluating."""
        metrics = [evaluate_split(model, split, batch_size) if self.is_main else None]
        dist.broadcast_object_list(metrics, src=0)
        return metrics[0]

    def close(self) -> None:
        """Free the wrappers while their group still exists (one collected after the group is
        gone can abort the process at exit), wait for every rank (rank 0 may still be saving
        the model), then leave the group."""
        self._wrappers.clear()
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="torchrun --nproc-per-node N -m esmm.distributed",
        description="Stage `train` with DistributedDataParallel, one process per rank "
        "(prepare the data first: esmm prepare -c CONFIG).",
    )
    parser.add_argument("-c", "--config", type=Path, default=Path("conf/default.yaml"))
    parser.add_argument(
        "-s", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE"
    )
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Exit status 2 for a configuration the job cannot run, 1 for bad data or a failed run
    (torchrun then stops the other ranks), 0 when rank 0 has saved the model."""
    from esmm.progress import setup_logging

    args = parse_args(argv)
    setup_logging()
    if "WORLD_SIZE" not in os.environ:
        print(
            "esmm.distributed runs under torchrun: "
            "torchrun --nproc-per-node N -m esmm.distributed -c CONFIG",
            file=sys.stderr,
        )
        return 2
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
    try:
        config = load_config(args.config, args.overrides)
        check_batch_size(config.train.batch_size, world_size)
    except ConfigError as error:  # every rank says it: the first to exit stops the others
        print(f"rank {rank}: config error: {error}", file=sys.stderr)
        return 2

    dist.init_process_group(BACKEND)
    parallel = DataParallel(dist.get_rank(), dist.get_world_size())
    log.info(
        "%d processes (%s), %d rows per process per step",
        world_size,
        BACKEND,
        config.train.batch_size // world_size,
    )
    try:
        _, result = train_stage(
            config,
            resume=args.resume,
            progress=parallel.is_main and not args.quiet,
            parallel=parallel,
        )
    except (DataError, TrainingDiverged, CheckpointMismatch, FileNotFoundError) as error:
        print(f"rank {rank}: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    log.info(
        "best epoch %d: validation %s = %.4f; model saved to %s",
        result.best_epoch,
        result.monitor,
        result.best_value,
        config.output_path / "model",
    )
    parallel.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
