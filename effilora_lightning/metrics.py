"""Per-task accuracy for generation-based evaluation that counts every sample exactly once.

The distributed sampler pads the last batches with repeated samples so that every rank gets the same
number; summing correct/total counts would count those twice. ``TaskAccuracy`` keeps (sample id, task,
correct) per sample, gathers them across ranks, and drops repeated sample ids before computing accuracy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from effilora_lightning.data.commonsense_prompts import TASKS

__all__ = ["TaskAccuracy", "format_table"]


class TaskAccuracy(Metric):
    """Accuracy per task and their unweighted mean ("average"), each sample id counted once.

    Args:
        tasks: the task names that ``update`` may receive, in reporting order (default: the 8 ``TASKS``).

    Example:
        >>> metric = TaskAccuracy(["boolq", "piqa"])
        >>> metric.update(["boolq", "piqa", "boolq"], torch.tensor([True, False, True]), torch.tensor([0, 1, 0]))
        >>> {k: round(v.item(), 2) for k, v in metric.compute().items()}
        {'boolq': 1.0, 'piqa': 0.0, 'average': 0.5}
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, tasks: Sequence[str] = TASKS, **kwargs) -> None:
        super().__init__(**kwargs)
        if not tasks or len(set(tasks)) != len(tasks):
            raise ValueError(f"tasks must be a non-empty list of distinct names, got {list(tasks)}")
        self.tasks = list(tasks)
        self._index = {task: i for i, task in enumerate(self.tasks)}
        self.add_state("sample_ids", default=[], dist_reduce_fx="cat")
        self.add_state("task_ids", default=[], dist_reduce_fx="cat")
        self.add_state("correct", default=[], dist_reduce_fx="cat")

    def update(self, tasks: Sequence[str], correct: Tensor, sample_ids: Tensor) -> None:
        """Record one batch: the task of each sample, whether its answer was right, and its unique id."""
        correct, sample_ids = correct.flatten(), sample_ids.flatten()
        if not (len(tasks) == correct.numel() == sample_ids.numel()):
            raise ValueError(f"tasks ({len(tasks)}), correct ({correct.numel()}) and sample_ids "
                             f"({sample_ids.numel()}) must have one entry per sample")
        unknown = sorted({t for t in tasks if t not in self._index})
        if unknown:
            raise ValueError(f"unknown tasks {unknown}; this metric was built for {self.tasks}")
        device = sample_ids.device
        self.sample_ids.append(sample_ids.long())
        self.task_ids.append(torch.tensor([self._index[t] for t in tasks], dtype=torch.long, device=device))
        self.correct.append(correct.to(device=device, dtype=torch.bool))

    def compute(self) -> dict[str, Tensor]:
        """{task: accuracy} for tasks with samples, in ``tasks`` order, plus "average" (NaN when empty)."""
        if isinstance(self.sample_ids, list) and not self.sample_ids:
            return {"average": torch.tensor(float("nan"))}
        ids, task_ids, correct = (dim_zero_cat(s) for s in (self.sample_ids, self.task_ids, self.correct))
        keep = _first_occurrences(ids)
        task_ids, correct = task_ids[keep], correct[keep].float()
        n = len(self.tasks)
        totals = torch.bincount(task_ids, minlength=n).float()
        hits = torch.bincount(task_ids, weights=correct, minlength=n)
        result = {task: hits[i] / totals[i] for i, task in enumerate(self.tasks) if totals[i] > 0}
        result["average"] = torch.stack(list(result.values())).mean()
        return result

    def counts(self) -> dict[str, int]:
        """Deduplicated number of samples per task (tasks with none are left out), over all ranks like
        ``compute``: the states are gathered for the count and restored after (a collective: every rank calls)."""
        with self.sync_context(should_sync=self.sync_on_compute):
            if isinstance(self.sample_ids, list) and not self.sample_ids:
                return {}
            ids, task_ids = dim_zero_cat(self.sample_ids), dim_zero_cat(self.task_ids)
            totals = torch.bincount(task_ids[_first_occurrences(ids)], minlength=len(self.tasks))
            return {task: int(totals[i]) for i, task in enumerate(self.tasks) if totals[i] > 0}


def _first_occurrences(ids: Tensor) -> Tensor:
    """Indices of the first occurrence of every distinct id (duplicates of one sample give the same result)."""
    order = torch.argsort(ids, stable=True)
    sorted_ids = ids[order]
    first = torch.ones_like(sorted_ids, dtype=torch.bool)
    first[1:] = sorted_ids[1:] != sorted_ids[:-1]
    return order[first]


def format_table(results: Mapping[str, float | Tensor], counts: Mapping[str, int] | None = None) -> str:
    """A markdown table of accuracy (in %) per task, "average" last, with sample counts when given."""
    header = "| task | accuracy (%) |" + (" n |" if counts is not None else "")
    rule = "|---|---:|" + ("---:|" if counts is not None else "")
    rows = [header, rule]
    names = [k for k in results if k != "average"] + (["average"] if "average" in results else [])
    for name in names:
        row = f"| {name} | {100 * float(results[name]):.1f} |"
        if counts is not None:
            row += f" {counts.get(name, sum(counts.values()) if name == 'average' else 0)} |"
        rows.append(row)
    return "\n".join(rows)
