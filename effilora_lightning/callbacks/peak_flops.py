"""Dense peak FLOP/s of a CUDA device, the denominator of MFU.

Lightning's ``get_available_flops`` has the H100/H200 at their 2:4-sparse rates (bf16 2.0e15 for the H200,
twice the dense rate, which would halve MFU) and finds no entry for the name an H200 reports ("NVIDIA H200":
neither "sxm1" nor "nvl1" in it, so no MFU at all). The datasheets' dense figures come first here; Lightning's
table is the fallback for everything else.
"""

from __future__ import annotations

import torch

__all__ = ["DENSE_PEAK_FLOPS", "dense_peak_flops"]

DENSE_PEAK_FLOPS: list[tuple[str, dict[torch.dtype, float]]] = [
    ("h200 nvl", {torch.bfloat16: 835e12, torch.float16: 835e12, torch.float32: 60e12}),
    ("h200", {torch.bfloat16: 989.4e12, torch.float16: 989.4e12, torch.float32: 66.9e12}),
    ("h100 pcie", {torch.bfloat16: 756e12, torch.float16: 756e12, torch.float32: 51.2e12}),
    ("h100 nvl", {torch.bfloat16: 835e12, torch.float16: 835e12, torch.float32: 60e12}),
    ("h100", {torch.bfloat16: 989.4e12, torch.float16: 989.4e12, torch.float32: 66.9e12}),
    ("a100", {torch.bfloat16: 312e12, torch.float16: 312e12, torch.float32: 19.5e12}),
]
"""(lower-case substring of the device name, dense peak FLOP/s by dtype); the first match wins."""


def dense_peak_flops(device_name: str, dtype: torch.dtype, device: torch.device | None = None) -> float | None:
    """Dense peak FLOP/s of a device called ``device_name`` at ``dtype``; Lightning's table for devices not
    listed here (``device`` needed for that), None when neither knows it."""
    name = device_name.lower()
    for key, table in DENSE_PEAK_FLOPS:
        if key in name and dtype in table:
            return table[dtype]
    if device is None:
        return None
    from lightning.fabric.utilities.throughput import get_available_flops

    return get_available_flops(device, dtype)
