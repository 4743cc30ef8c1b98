"""The one seeded validation split both DataModules hold out of a training file.

``val_set_size`` records are drawn by ``random.Random(seed).shuffle`` over the record positions, so the split
depends only on (number of records, val_set_size, seed): the same in every run and on every rank, and the same
for a commonsense and a visual instruction file of the same length. Both parts keep file order.
"""

from __future__ import annotations

import random
from typing import NamedTuple

__all__ = ["Split", "seeded_split"]


class Split(NamedTuple):
    """Positions (0 .. n - 1) of the records in each part, ascending."""

    train: list[int]
    held_out: list[int]


def seeded_split(num_records: int, val_set_size: int, seed: int) -> Split:
    """Hold ``val_set_size`` of ``num_records`` positions out for validation, the rest for training.

    A ``val_set_size`` of ``num_records`` or more holds everything out; the caller decides whether an empty
    training part is an error (and says which file and setting).

    Raises:
        ValueError: a negative count.
    """
    if num_records < 0 or val_set_size < 0:
        raise ValueError(f"seeded_split needs counts >= 0, got num_records={num_records}, "
                         f"val_set_size={val_set_size}")
    order = list(range(num_records))
    random.Random(seed).shuffle(order)
    return Split(train=sorted(order[val_set_size:]), held_out=sorted(order[:val_set_size]))
