"""What the GPU tests share: the skip marks, a dense peak FLOP/s table, a logger that keeps metrics, comparisons.

Importable from the test modules beside it (pytest puts tests/gpu on sys.path) and from fsdp_worker.py.
"""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.loggers import Logger

CUDA = torch.cuda.is_available()

# Every test module here: ``pytestmark = GPU_MARKS``. Without CUDA each test is collected and skipped, with
# this reason, so that ``pytest -m gpu`` on a CPU box reports them all as skipped and none as failed.
GPU_MARKS = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA device (torch.cuda.is_available() is False)")]

# Dense bf16 peak FLOP/s by datasheet (no 2:4 sparsity), by device-name substring, first match wins.
# Lightning's table (EffiLoRACallback's default) has no entry for the name an H200 reports, 'NVIDIA H200'.
_DENSE_BF16 = [("h200 nvl", 835e12), ("h200", 989.4e12), ("h100 pcie", 756e12), ("h100 nvl", 835e12),
               ("h100", 989.4e12), ("a100", 312e12)]


def dense_bf16_peak(device: int = 0) -> float:
    """Datasheet dense bf16 FLOP/s of the CUDA device; 1e15 (above any listed card) when unlisted, so that an
    MFU against it is still a fraction of the truth, never above 1 because of the table."""
    name = torch.cuda.get_device_name(device).lower()
    return next((flops for key, flops in _DENSE_BF16 if key in name), 1e15)


class MemoryLogger(Logger):
    """Keeps every ``log_metrics`` call as (step, metrics): what EffiLoRACallback and ``self.log`` wrote."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.records.append((step, {k: float(v) for k, v in metrics.items()}))

    def values(self, key: str) -> list[float]:
        return [m[key] for _, m in self.records if key in m]


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| in float64 (METHOD.md's measure); inf when x holds a NaN or an inf."""
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(x).all():
        return float("inf")
    return float((x - ref).norm() / ref.norm().clamp_min(1e-30))
