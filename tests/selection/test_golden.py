"""Golden values of the selection on hand-made units: every score, EMA and pick below is worked out by hand.

Three units over four B: unit 0 = {p0}, unit 1 = {p1}, unit 2 = {p2, p3}.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from effilora_lightning.selection import ImportanceTracker, Reducer, SelectableUnits, SelectionConfig, local_unit_scores


def _units(*values: list[float], owner: tuple[int, ...] = (0, 1, 2, 2)) -> SelectableUnits:
    params = tuple(nn.Parameter(torch.tensor(v)) for v in values)
    numel = torch.zeros(max(owner) + 1, dtype=torch.long).index_add_(0, torch.tensor(owner),
                                                                     torch.tensor([p.numel() for p in params]))
    return SelectableUnits(tuple(f"layers.{u}" for u in range(max(owner) + 1)), params, torch.tensor(owner), numel)


def _scores(units: SelectableUnits, importance: str) -> tuple[list[float], list[bool]]:
    scores, observed = local_unit_scores(units.params, units.unit_of_param, units.num_units, importance)
    return scores.tolist(), observed


@pytest.fixture
def units() -> SelectableUnits:
    u = _units([1.0, -2.0], [3.0], [1.0], [-1.0, 2.0])
    u.params[0].grad = torch.tensor([0.5, 1.0])   # unit 0 observed
    u.params[2].grad = torch.tensor([-4.0])       # unit 2 observed through p2 only; p3 and unit 1: no gradient
    return u


def test_taylor_and_grad_norm_scores(units):
    # taylor: sum |B * g|: unit 0 = |1*0.5| + |-2*1| = 2.5; unit 2 = |1*-4| = 4 (p3 has no grad)
    assert _scores(units, "taylor") == ([2.5, 0.0, 4.0], [True, False, True])
    # grad_norm: sum g^2: unit 0 = 0.25 + 1 = 1.25; unit 2 = 16
    assert _scores(units, "grad_norm") == ([1.25, 0.0, 16.0], [True, False, True])


def test_weight_norm_scores_every_unit_without_gradients(units):
    # sum B^2: unit 0 = 1 + 4 = 5; unit 1 = 9; unit 2 = 1 + (1 + 4) = 6; a weight needs no gradient: all observed
    assert _scores(units, "weight_norm") == ([5.0, 9.0, 6.0], [True, True, True])


def test_random_importance_scores_nothing_but_still_tracks_what_was_observed(units):
    assert _scores(units, "random") == ([0.0, 0.0, 0.0], [True, False, True])


def test_topk_keeps_the_highest_ema_ties_to_the_lower_index():
    tracker = ImportanceTracker(4)
    tracker.ema = torch.tensor([0.2, 0.9, 0.5, 0.9], dtype=torch.float64)
    assert tracker.select(2, "topk", 1.0, seed=0, step=7).tolist() == [False, True, False, True]
    assert tracker.select(3, "topk", 1.0, seed=0, step=7).tolist() == [False, True, True, True]
    tracker.ema = torch.tensor([0.5, 0.5, 0.1, 0.0], dtype=torch.float64)
    assert tracker.select(1, "topk", 1.0, seed=5, step=0).tolist() == [True, False, False, False]


def test_random_selection_is_the_seeded_permutation_and_ignores_scores():
    # the generator of (seed, step) is seeded with seed * 1_000_003 + step; its randperm's first k units are kept
    tracker = ImportanceTracker(5)
    picks = {}
    for seed, step in ((0, 3), (2, 3), (2, 4)):
        perm = torch.randperm(5, generator=torch.Generator().manual_seed(seed * 1_000_003 + step))[:2].tolist()
        expected = [u in perm for u in range(5)]
        picks[seed, step] = tracker.select(2, "random", 1.0, seed=seed, step=step).tolist()
        assert picks[seed, step] == expected and sum(expected) == 2
        tracker.ema = torch.arange(5, dtype=torch.float64) * 10  # scores change; the draw does not
        assert tracker.select(2, "random", 1.0, seed=seed, step=step).tolist() == expected
        tracker.ema = torch.zeros(5, dtype=torch.float64)
    assert picks[0, 3] == [True, True, False, False, False]  # randperm -> [1, 0, 3, 4, 2] on the CPU generator
    assert len({tuple(p) for p in picks.values()}) == 3  # seed and step both change the draw


@pytest.mark.parametrize(("temperature", "expected_top"), [
    (1.0, math.exp(1) / (math.exp(-1) + math.exp(1))),      # z = [-1, 1]: softmax -> 0.8808
    (2.0, math.exp(0.5) / (math.exp(-0.5) + math.exp(0.5))),  # z / 2 = [-0.5, 0.5] -> 0.7311
    (0.25, math.exp(4) / (math.exp(-4) + math.exp(4))),     # z / 0.25 = [-4, 4] -> 0.99966
])
def test_sample_probs_follow_the_temperature(temperature, expected_top):
    tracker = ImportanceTracker(2)
    tracker.ema = torch.tensor([3.0, 5.0], dtype=torch.float64)  # mean 4, population std 1: z = [-1, 1]
    probs = tracker.sample_probs(temperature).tolist()
    assert probs == pytest.approx([1 - expected_top, expected_top], abs=1e-12)
    tracker.ema = tracker.ema * 1000  # z-scored: the scale of the scores does not matter
    assert tracker.sample_probs(temperature).tolist() == pytest.approx(probs, abs=1e-12)


def test_four_units_at_half_temperature():
    tracker = ImportanceTracker(4)
    tracker.ema = torch.tensor([0.0, 0.0, 2.0, 2.0], dtype=torch.float64)  # mean 1, std 1: z = [-1, -1, 1, 1]
    low, high = math.exp(-2), math.exp(2)  # z / 0.5
    expected = [low, low, high, high]
    assert tracker.sample_probs(0.5).tolist() == pytest.approx([e / sum(expected) for e in expected], abs=1e-12)


@pytest.mark.parametrize("frozen_score", ["keep", "decay"])
def test_frozen_units_keep_or_decay_their_ema(frozen_score):
    tracker = ImportanceTracker(2, ema_beta=0.5, frozen_score=frozen_score)
    tracker.update(torch.tensor([4.0, 8.0]), [True, True])   # first sight: the score itself
    assert tracker.ema.tolist() == [4.0, 8.0]
    tracker.update(torch.tensor([2.0, 0.0]), [True, False])  # unit 0: 0.5*4 + 0.5*2 = 3; unit 1 frozen
    assert tracker.ema.tolist() == ([3.0, 8.0] if frozen_score == "keep" else [3.0, 4.0])  # decay: 8 * 0.5
    tracker.update(torch.tensor([0.0, 6.0]), [False, True])  # unit 1: 0.5*8 + 0.5*6 = 7 (keep), 0.5*4 + 0.5*6 = 5
    assert tracker.ema.tolist() == ([3.0, 7.0] if frozen_score == "keep" else [1.5, 5.0])  # decay: 3 * 0.5


def test_decay_leaves_a_never_seen_unit_at_zero_and_its_first_sight_sets_it():
    tracker = ImportanceTracker(2, ema_beta=0.5, frozen_score="decay")
    tracker.update(torch.tensor([4.0, 0.0]), [True, False])
    assert tracker.ema.tolist() == [4.0, 0.0] and tracker.seen.tolist() == [True, False]
    tracker.update(torch.tensor([4.0, 10.0]), [True, True])  # unit 1's first observation: 10, not 0.5 * 10
    assert tracker.ema.tolist() == [4.0, 10.0]


def _drive(every_n_steps: int) -> tuple[list[list[int]], list[int]]:
    """Five steps of a Reducer on three one-weight units; weight_norm + top-1, ema_beta 0 (EMA = this step's score).

    Weights: steps 0-1 [1, 2, 3] (unit 2 largest), steps 2-4 [9, 2, 1] (unit 0 largest). Warm-up 2 steps.
    """
    units = _units([1.0], [2.0], [3.0], owner=(0, 1, 2))
    config = SelectionConfig(keep_ratio=1 / 3, importance="weight_norm", selection="topk", ema_beta=0.0,
                             warmup_steps=2, every_n_steps=every_n_steps)
    reducer = Reducer(units, config)
    for step in range(5):
        reducer.begin_step()
        if step == 2:
            with torch.no_grad():
                for p, w in zip(units.params, (9.0, 2.0, 1.0)):
                    p.fill_(w)
        reducer.end_step(step)
    history = [torch.nonzero(s).flatten().tolist() for s in reducer.history]
    return history, torch.nonzero(reducer.selected).flatten().tolist()


def test_every_n_steps_holds_the_selection_between_re_selections():
    # every 3: steps 0, 1 warm-up (all); chosen at step 2 from step 1's scores [1, 4, 9] -> unit 2; held at 3 and 4
    # ((3 - 2) % 3, (4 - 2) % 3 != 0) although unit 0 leads from step 2 on; re-chosen at step 5 -> unit 0
    assert _drive(every_n_steps=3) == ([[0, 1, 2], [0, 1, 2], [2], [2], [2]], [0])
    # every step: unit 0 takes over at step 3, from step 2's scores [81, 4, 1]
    assert _drive(every_n_steps=1) == ([[0, 1, 2], [0, 1, 2], [2], [0], [0]], [0])


def test_requires_grad_follows_the_selection_in_force():
    units = _units([1.0], [2.0], [3.0], owner=(0, 1, 2))
    reducer = Reducer(units, SelectionConfig(keep_ratio=1 / 3, importance="weight_norm", selection="topk",
                                             warmup_steps=0))
    reducer.begin_step()  # step 0: top-1 of an all-zero EMA -> unit 0 (ties to the lower index)
    assert [p.requires_grad for p in units.params] == [True, False, False]
    reducer.end_step(0)  # scores [1, 4, 9] -> unit 2
    reducer.begin_step()
    assert [p.requires_grad for p in units.params] == [False, False, True]
