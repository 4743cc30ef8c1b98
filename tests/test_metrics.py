"""TaskAccuracy counts each sample id once (distributed-sampler duplicates) and averages over tasks with data."""

from __future__ import annotations

import math

import pytest
import torch

from effilora_lightning.metrics import TaskAccuracy, format_table


def update(metric: TaskAccuracy, rows: list[tuple[str, bool, int]]) -> None:
    tasks, correct, ids = zip(*rows)
    metric.update(list(tasks), torch.tensor(correct), torch.tensor(ids))


def values(result: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: round(float(v), 6) for k, v in result.items()}


def test_accuracy_per_task_and_average_over_tasks_with_samples() -> None:
    metric = TaskAccuracy()
    update(metric, [("boolq", True, 0), ("boolq", False, 1), ("boolq", True, 2), ("piqa", True, 10),
                    ("piqa", True, 11)])
    result = metric.compute()
    assert list(result) == ["boolq", "piqa", "average"]  # tasks without samples are left out
    assert values(result) == {"boolq": round(2 / 3, 6), "piqa": 1.0, "average": round((2 / 3 + 1) / 2, 6)}
    assert metric.counts() == {"boolq": 3, "piqa": 2}


def test_duplicate_sample_ids_count_once() -> None:
    metric = TaskAccuracy(["boolq", "piqa"])
    update(metric, [("boolq", True, 0), ("boolq", False, 1)])
    update(metric, [("boolq", True, 0), ("piqa", False, 5), ("boolq", True, 0)])  # sampler padding repeats id 0
    assert values(metric.compute()) == {"boolq": 0.5, "piqa": 0.0, "average": 0.25}
    assert metric.counts() == {"boolq": 2, "piqa": 1}


def test_duplicates_across_ranks_after_merge() -> None:
    """Two ranks' states gathered into one (what dist_reduce_fx='cat' does), the padded sample on both."""
    rank0, rank1 = TaskAccuracy(["hellaswag"]), TaskAccuracy(["hellaswag"])
    update(rank0, [("hellaswag", True, 0), ("hellaswag", False, 2), ("hellaswag", True, 4)])
    update(rank1, [("hellaswag", True, 1), ("hellaswag", True, 3), ("hellaswag", True, 0)])  # 0 = padding
    rank0.merge_state(rank1)
    assert values(rank0.compute()) == {"hellaswag": 0.8, "average": 0.8}
    assert rank0.counts() == {"hellaswag": 5}


def test_counts_cover_every_rank_like_the_accuracies(monkeypatch) -> None:
    """counts() gathers the states as compute() does (the test table once showed one rank's share), then
    restores the local ones. The all-gather is faked: a second rank that saw ids + 100, all correct."""
    import torchmetrics.metric

    peers = iter([lambda t: t + 100, lambda t: t, lambda t: torch.ones_like(t)])  # sample_ids, task_ids, correct
    monkeypatch.setattr(torchmetrics.metric, "gather_all_tensors", lambda t, group=None: [t, next(peers)(t)])
    metric = TaskAccuracy(["boolq", "piqa"], distributed_available_fn=lambda: True)
    update(metric, [("boolq", True, 0), ("boolq", False, 1), ("piqa", True, 2)])
    assert metric.counts() == {"boolq": 4, "piqa": 2}
    assert metric.sample_ids[0].tolist() == [0, 1, 2]  # local state back: accumulation can go on


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_synced_tensor_states_are_deduplicated_too() -> None:
    """After a real all-gather the list states are already concatenated tensors."""
    metric = TaskAccuracy(["boolq", "piqa"])
    metric.sample_ids = torch.tensor([7, 3, 7, 9])
    metric.task_ids = torch.tensor([1, 0, 1, 0])
    metric.correct = torch.tensor([True, False, True, True])
    assert values(metric.compute()) == {"boolq": 0.5, "piqa": 1.0, "average": 0.75}


def test_results_follow_task_order_not_arrival_order() -> None:
    metric = TaskAccuracy(["boolq", "piqa", "winogrande"])
    update(metric, [("winogrande", True, 20), ("boolq", False, 0)])
    assert list(metric.compute()) == ["boolq", "winogrande", "average"]


def test_reset_clears_samples() -> None:
    metric = TaskAccuracy(["boolq"])
    update(metric, [("boolq", True, 0)])
    metric.reset()
    update(metric, [("boolq", False, 0)])
    assert values(metric.compute()) == {"boolq": 0.0, "average": 0.0}


def test_empty_metric_average_is_nan() -> None:
    with pytest.warns(UserWarning):  # torchmetrics warns about compute() before update()
        result = TaskAccuracy().compute()
    assert list(result) == ["average"] and math.isnan(float(result["average"]))


def test_update_validates_inputs() -> None:
    metric = TaskAccuracy(["boolq"])
    with pytest.raises(ValueError, match=r"tasks \(2\), correct \(1\) and sample_ids \(1\)"):
        metric.update(["boolq", "boolq"], torch.tensor([True]), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"unknown tasks \['piqa'\]; this metric was built for \['boolq'\]"):
        metric.update(["piqa"], torch.tensor([True]), torch.tensor([0]))
    with pytest.raises(ValueError, match="distinct names"):
        TaskAccuracy(["boolq", "boolq"])


def test_format_table() -> None:
    table = format_table({"boolq": 0.5, "piqa": torch.tensor(0.25), "average": 0.375}, {"boolq": 4, "piqa": 4})
    assert table == (
        "| task | accuracy (%) | n |\n"
        "|---|---:|---:|\n"
        "| boolq | 50.0 | 4 |\n"
        "| piqa | 25.0 | 4 |\n"
        "| average | 37.5 | 8 |"
    )
    assert format_table({"average": 1.0, "boolq": 1.0}).splitlines()[-1] == "| average | 100.0 |"
