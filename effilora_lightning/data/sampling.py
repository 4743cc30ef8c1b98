"""A training sampler that can start mid-epoch, so that ``--ckpt_path last`` resumes the exact data order.

Lightning restores a checkpoint's training progress but not a plain DataLoader's position: a resumed run
would replay its epoch from the start. ``ResumableSampler`` is a ``DistributedSampler`` (so Lightning keeps
it, and every rank reads its own shard) whose order depends only on (seed, epoch); the DataModule records
how many batches of the epoch were consumed and the sampler skips them once, on the first pass after resume.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch.utils.data import Dataset, DistributedSampler

__all__ = ["ResumableSampler", "consumed_batches"]


class ResumableSampler(DistributedSampler):
    """Seeded per-epoch shuffle (DistributedSampler's) that can skip the samples already consumed."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, shuffle: bool, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.resume_epoch: int | None = None
        self.resume_skip = 0  # samples of this rank to skip in ``resume_epoch``

    def resume_at(self, epoch: int, samples: int) -> None:
        self.resume_epoch, self.resume_skip = epoch, samples

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.resume_epoch:
            self.resume_epoch = None  # the resumed epoch is over: later epochs run whole
        super().set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        if self.resume_epoch == self.epoch:  # every pass over the resumed epoch (Lightning may call iter twice)
            indices = indices[self.resume_skip:]
        return iter(indices)


def consumed_batches(trainer: Any) -> dict[str, int]:
    """Epoch and training batches consumed so far in it (a save in on_train_batch_end counts its batch)."""
    progress = trainer.fit_loop.epoch_loop.batch_progress.current
    return {"epoch": int(trainer.current_epoch), "batches": int(progress.processed)}
