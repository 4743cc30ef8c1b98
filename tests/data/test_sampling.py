"""ResumableSampler: order by (seed, epoch) only, and a resume skip that lasts exactly the resumed epoch."""

from __future__ import annotations

import pytest

from effilora_lightning.data.sampling import ResumableSampler


def _sampler(rank: int = 0) -> ResumableSampler:
    return ResumableSampler(list(range(23)), num_replicas=2, rank=rank, shuffle=True, seed=7)


def _epoch_order(epoch: int, rank: int = 0) -> list[int]:
    sampler = _sampler(rank)
    sampler.set_epoch(epoch)
    return list(sampler)


def test_resume_at_moves_to_the_epoch_before_any_set_epoch():
    # with num_workers > 0 Lightning draws the first indices before it calls set_epoch
    sampler = _sampler(rank=1)
    sampler.resume_at(3, 5)
    assert sampler.epoch == 3
    assert list(sampler) == _epoch_order(3, rank=1)[5:]


def test_skip_holds_for_every_pass_over_the_resumed_epoch_only():
    sampler = _sampler()
    sampler.resume_at(1, 4)
    sampler.set_epoch(1)
    assert list(sampler) == list(sampler) == _epoch_order(1)[4:]
    sampler.set_epoch(2)
    assert list(sampler) == _epoch_order(2)
    sampler.set_epoch(1)  # the skip is gone for good once the resumed epoch is over
    assert list(sampler) == _epoch_order(1)


def test_resume_at_refuses_negative_positions():
    with pytest.raises(ValueError, match="epoch >= 0 and samples >= 0"):
        _sampler().resume_at(0, -1)


def _trainer(fn: str, training: bool, epoch: int = 2, processed: int = 5):
    from types import SimpleNamespace

    from lightning.pytorch.trainer.states import TrainerFn

    progress = SimpleNamespace(current=SimpleNamespace(processed=processed))
    return SimpleNamespace(state=SimpleNamespace(fn=TrainerFn(fn)), training=training, current_epoch=epoch,
                           fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress)))


def test_position_is_recorded_during_a_mid_epoch_validation_save():
    """ModelCheckpoint saves in on_validation_end, where trainer.training is False: still fitting."""
    from effilora_lightning.data.sampling import consumed_batches

    assert consumed_batches(_trainer("fit", training=False)) == {"epoch": 2, "batches": 5}
    assert consumed_batches(_trainer("fit", training=True)) == {"epoch": 2, "batches": 5}
    assert consumed_batches(_trainer("validate", training=False)) == {}
    assert consumed_batches(None) == {}


def test_a_resume_silences_only_lightnings_not_resumable_warning():
    import warnings

    from lightning.pytorch.utilities.warnings import PossibleUserWarning

    from effilora_lightning.data.sampling import checked_position

    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()  # no filter another test left behind (the benchmark smoke tests ignore all)
        warnings.simplefilter("always")
        checked_position({"epoch": 0, "batches": 3}, "CommonsenseDataModule")
        warnings.warn("You're resuming from a checkpoint that ended before the epoch ended and your dataloader is"
                      " not resumable. This can cause unreliable results.", PossibleUserWarning, stacklevel=1)
        warnings.warn("something else", PossibleUserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something else"]


def test_length_windows_play_their_batches_in_a_shuffled_order():
    """Each global batch holds similar lengths, but a window's batches do not run longest to shortest (on
    multi-task data that is a run of one task: the commonsense demo fell from 71 % to 12 % that way)."""
    from effilora_lightning.data.sampling import ModalityLengthGroupedSampler

    lengths = list(range(64))
    sampler = ModalityLengthGroupedSampler(lengths, [False] * 64, batch_size=4, seed=3, batches_per_window=16)
    order = sampler.global_order()
    batches = [order[k: k + 4] for k in range(0, 64, 4)]
    assert all(max(b) - min(b) == 3 for b in batches)  # 64 lengths, one window: 16 batches of 4 neighbours
    maxima = [max(b) for b in batches]
    assert sorted(order) == lengths and maxima != sorted(maxima, reverse=True)
