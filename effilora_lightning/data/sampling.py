"""A training sampler that can start mid-epoch, so that ``--ckpt_path last`` resumes the exact data order.

Lightning restores a checkpoint's training progress but not a plain DataLoader's position: a resumed run
would replay its epoch from the start. ``ResumableSampler`` is a ``DistributedSampler`` (so Lightning keeps
it, and every rank reads its own shard) whose order depends only on (seed, epoch); the DataModule records
how many batches of the epoch were consumed and the sampler skips them once, on the first pass after resume.

Subclasses with another order (``ModalityLengthGroupedSampler``) override ``rank_indices`` and keep the skip.
``TrainingOrder`` is the one path both DataModules take: it builds the sampler, saves the position in the
DataModule's ``state_dict`` and applies a loaded one once.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import Any

from torch.utils.data import Dataset, DistributedSampler

__all__ = [
    "ModalityLengthGroupedSampler",
    "ResumableSampler",
    "TrainingOrder",
    "checked_position",
    "consumed_batches",
    "require_training_batches",
    "resume_sampler",
    "training_position",
]


class ResumableSampler(DistributedSampler):
    """Seeded per-epoch shuffle (DistributedSampler's) that can skip the samples already consumed."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, shuffle: bool, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.resume_epoch: int | None = None
        self.resume_skip = 0  # samples of this rank to skip in ``resume_epoch``

    def resume_at(self, epoch: int, samples: int) -> None:
        """Skip this rank's first ``samples`` indices of ``epoch`` (every pass over it, none after it).

        Also moves to ``epoch``: with ``num_workers > 0`` Lightning draws the first indices when it builds the
        iterator, before its ``set_epoch`` call, and a fresh sampler would otherwise start from epoch 0.
        """
        if epoch < 0 or samples < 0:
            raise ValueError(f"resume_at needs epoch >= 0 and samples >= 0, got epoch={epoch}, samples={samples}")
        self.resume_epoch, self.resume_skip = epoch, samples
        self.set_epoch(epoch)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.resume_epoch:
            self.resume_epoch = None  # the resumed epoch is over: later epochs run whole
        super().set_epoch(epoch)

    def rank_indices(self) -> list[int]:
        """This rank's whole share of the current epoch, before any resume skip; depends on (seed, epoch) only."""
        return list(super().__iter__())

    def __iter__(self) -> Iterator[int]:
        indices = self.rank_indices()
        if self.resume_epoch == self.epoch:  # every pass over the resumed epoch (Lightning may call iter twice)
            indices = indices[self.resume_skip:]
        return iter(indices)


class ModalityLengthGroupedSampler(ResumableSampler):
    """Seeded order in which every window of `batch_size * num_replicas` indices is one modality (all with
    images or all text-only) and sorted by length, so each rank's batch is homogeneous and little padded.

    Windows are cut from a per-modality shuffle and then shuffled; the two partial windows go last. The
    sampler shards itself: rank r takes positions r, r + R, ... of the (padded) order, so batch b of every
    rank lies inside window b. Being a DistributedSampler (via `ResumableSampler`), Lightning keeps it under
    DDP instead of wrapping it. The order depends only on (seed, epoch): iterating twice in an epoch gives the
    same indices, Lightning's `set_epoch` moves to the next order, and `resume_at` skips consumed samples.
    Only the last (at most two) batches of a rank can mix modalities: the partial windows and the padding.

    ``batches_per_window > 1`` sorts a window of that many global batches by length before cutting it into
    batches (Hugging Face's ``group_by_length`` megabatches), which is what removes padding inside a batch
    when every sample has the same modality (the commonsense tasks).
    """

    def __init__(self, lengths: Sequence[int], has_image: Sequence[bool], batch_size: int,
                 num_replicas: int = 1, rank: int = 0, seed: int = 0, batches_per_window: int = 1) -> None:
        if len(lengths) != len(has_image):
            raise ValueError(f"lengths ({len(lengths)}) and has_image ({len(has_image)}) differ in length")
        if min(batch_size, num_replicas, batches_per_window) < 1:
            raise ValueError(f"batch_size, num_replicas and batches_per_window must be >= 1, got {batch_size}, "
                             f"{num_replicas} and {batches_per_window}")
        # DistributedSampler only takes len() of its dataset: the indices stand in for it
        super().__init__(range(len(lengths)), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.lengths, self.has_image = list(lengths), list(has_image)
        self.window = batch_size * num_replicas * batches_per_window
        self.batches_per_window = batches_per_window

    def global_order(self) -> list[int]:
        """Every index once, for all ranks together: the global batches of the full one-modality windows
        (each window sorted longest first) in a seeded shuffle, then the partial windows. Shuffling batches,
        not windows, matters with ``batches_per_window > 1``: a window played in order sweeps from its longest
        batch to its shortest, and on multi-task data (lengths differ by task) that is a long run of one task
        (the commonsense demo fell to 12 % that way). Depends on (seed, epoch) only."""
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        batch = self.window // self.batches_per_window  # one global batch: every rank's share of one step
        full, partial = [], []
        for modality in (True, False):
            idx = [i for i, m in enumerate(self.has_image) if m == modality]
            rng.shuffle(idx)
            for window in (idx[k: k + self.window] for k in range(0, len(idx), self.window)):
                window.sort(key=lambda i: -self.lengths[i])
                if len(window) == self.window:
                    full += [window[k: k + batch] for k in range(0, len(window), batch)]
                else:
                    partial.append(window)
        rng.shuffle(full)
        return [i for group in full + partial for i in group]

    def rank_indices(self) -> list[int]:
        """This rank's positions of the global order, padded like DistributedSampler (repeating its start)
        so that every rank gets `num_samples` indices."""
        order = self.global_order()
        if not order:
            return []
        while len(order) < self.total_size:
            order += order[: self.total_size - len(order)]
        return order[self.rank: self.total_size: self.num_replicas]


def consumed_batches(trainer: Any) -> dict[str, int]:
    """Epoch and training batches consumed so far in it (a save in on_train_batch_end counts its batch);
    empty outside of fitting. Fitting, not ``trainer.training``: ModelCheckpoint saves in
    ``on_validation_end`` after a mid-epoch validation, when ``trainer.training`` is False."""
    from lightning.pytorch.trainer.states import TrainerFn

    if trainer is None or trainer.state.fn != TrainerFn.FITTING:
        return {}
    progress = trainer.fit_loop.epoch_loop.batch_progress.current
    return {"epoch": int(trainer.current_epoch), "batches": int(progress.processed)}


def training_position(trainer: Any, batch_size: int) -> dict[str, int]:
    """A DataModule's ``state_dict``: the position in the epoch and the layout (world size, per-device batch)
    that the order was cut for; empty outside of fitting."""
    position = consumed_batches(trainer)
    return position | {"world_size": trainer.world_size, "batch_size": batch_size} if position else {}


def checked_position(state: dict[str, int], owner: str) -> dict[str, int] | None:
    """A DataModule's ``load_state_dict`` input, checked: None when empty, an error when not ours."""
    if not state:
        return None
    if not {"epoch", "batches"} <= state.keys():
        raise ValueError(f"datamodule state {state} lacks 'epoch'/'batches': the checkpoint was not written "
                         f"by {owner}; resume from one of its checkpoints")
    _silence_not_resumable_warning()
    return dict(state)


def _silence_not_resumable_warning() -> None:
    """Lightning warns on every mid-epoch resume that "your dataloader is not resumable": it looks for
    ``state_dict`` on the DataLoader, while ours lives in the DataModule, which Lightning saves and restores
    itself, and which makes the sampler skip exactly the consumed batches (tested). Only that warning goes.

    Why not torchdata's ``StatefulDataLoader``, whose state Lightning checkpoints natively: it is not one of the
    required packages (torchdata is not installed with torch), and its state is each rank's loader and workers'
    as they were, with nothing to check a changed world or batch size against; the position kept here is
    (epoch, batches consumed, world and batch size), which the samplers turn into exact skips and which warns
    when the world or batch size changed."""
    import warnings

    from lightning.pytorch.utilities.warnings import PossibleUserWarning

    warnings.filterwarnings("ignore", message=r"You're resuming from a checkpoint that ended before the epoch ended "
                            r"and your dataloader is not resumable", category=PossibleUserWarning)


def resume_sampler(sampler: ResumableSampler, position: dict[str, int], batch_size: int) -> None:
    """Make ``sampler`` skip this rank's consumed samples of the checkpoint's epoch. A changed world or batch
    size cannot replay the order: warn (positions saved before these keys existed are taken as unchanged)."""
    from lightning.pytorch.utilities import rank_zero_warn

    world = sampler.num_replicas
    saved = (position.get("world_size", world), position.get("batch_size", batch_size))
    if saved != (world, batch_size):
        rank_zero_warn(f"resuming epoch {position['epoch']} with world_size={world}, batch_size={batch_size} but the "
                       f"checkpoint used world_size={saved[0]}, batch_size={saved[1]}: the rest of this epoch "
                       "follows another order (some samples repeat or are missed). Resume with the same devices "
                       "and batch size for an exact continuation.")
    sampler.resume_at(position["epoch"], position["batches"] * batch_size)


def require_training_batches(trainer: Any) -> None:
    """Refuse a fit that would train nothing and still test and exit 0 (``max_steps: 0``, ``max_epochs: 0``,
    ``limit_train_batches: 0``), naming the setting. Called when a DataModule builds its training loader."""
    if trainer is None:
        return
    settings = {"max_steps": trainer.max_steps, "max_epochs": trainer.max_epochs,
                "limit_train_batches": trainer.limit_train_batches}
    zero = [f"trainer.{key}={value}" for key, value in settings.items() if value == 0]
    if zero:
        raise ValueError(f"{', '.join(zero)}: this fit would train on nothing. Give it at least one step, or run "
                         "`effilora test` / `effilora validate` to evaluate without training.")


class TrainingOrder:
    """A DataModule's training order and its mid-epoch resume: the sampler, the position to save, the skip.

    The batch size and seed are passed at each call, not kept: they are the DataModule's hyperparameters, which
    a tuner may change after construction. The saved position counts per-device batches of ``batch_size``.

    Args:
        owner: the DataModule's class name, for the error on a foreign checkpoint state.

    Example (in a LightningDataModule)::

        self.order = TrainingOrder(type(self).__name__)                     # __init__
        sampler = self.order.sampler(self.trainer, len(data), bs, seed)     # train_dataloader
        return self.order.state_dict(self.trainer, bs)                      # state_dict
        self.order.load_state_dict(state)                                   # load_state_dict
    """

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self._pending: dict[str, int] | None = None  # from a checkpoint: epoch and batches already consumed

    def sampler(self, trainer: Any, size: int, batch_size: int, seed: int, lengths: Sequence[int] | None = None,
                has_image: Sequence[bool] | None = None, batches_per_window: int = 1) -> ResumableSampler:
        """This rank's sampler over ``size`` samples: length-grouped when ``lengths`` are given (``has_image``
        defaults to all False), else a seeded shuffle. A loaded position is applied to it, once: a reloaded
        loader starts whole. Refuses a fit that would train nothing (``require_training_batches``)."""
        require_training_batches(trainer)
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler: ResumableSampler
        if lengths is not None:
            flags = [False] * len(lengths) if has_image is None else has_image
            sampler = ModalityLengthGroupedSampler(lengths, flags, batch_size, world, rank, seed,
                                                   batches_per_window=batches_per_window)
        else:
            sampler = ResumableSampler(range(size), num_replicas=world, rank=rank, shuffle=True, seed=seed)
        if self._pending is not None:
            resume_sampler(sampler, self._pending, batch_size)
            self._pending = None
        return sampler

    def state_dict(self, trainer: Any, batch_size: int) -> dict[str, int]:
        """Where training stands in its epoch (``training_position``); empty outside of fitting."""
        return training_position(trainer, batch_size)

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Remember a checkpoint's position; the next ``sampler`` skips what it had consumed."""
        self._pending = checked_position(state, self.owner)
