"""EfficiencyMonitor: tokens/s, samples/s, step time, peak memory and MFU of a training run, for any adapter method.

Logged every ``log_every_n_steps`` optimizer steps, straight to the Trainer's loggers (our period, not the
Trainer's), over the window since the last log point:

    perf/tokens_per_sec     non-padding tokens (attention_mask sum) of all ranks / seconds
    perf/samples_per_sec    samples of all ranks (a packed batch's num_samples) / seconds
    perf/step_time_sec      seconds / optimizer steps
    perf/peak_memory_mb     CUDA peak allocated (else the process's peak RSS), the MAX over ranks
    perf/mfu                training FLOP/s over (peak FLOP/s of one device x world size), when the peak is known

Why not Lightning's ``ThroughputMonitor`` (checked against lightning 2.6): it runs on rank 0 only and multiplies
rank 0's counts by the world size (our ranks' non-padding token counts differ); its ``length_fn`` returns a
Python int, a host sync every batch to count non-padding tokens, and it calls ``torch.cuda.synchronize()`` on
every batch; it logs ``train/device/mfu``-style names, not the ``perf/*`` names our logs, benchmarks and GPU check
read; it logs no memory; it needs ``flops_per_batch`` on the LightningModule (a user's module has none); and its
peak FLOP/s table lists the H100/H200 at their 2:4-sparse rates and misses "NVIDIA H200" (peak_flops.py). Here the
token counts stay on the device until a log point, where one all-reduce each (SUM of counts, MAX of memory)
completes them; the peak comes from the datasheets' dense figures.
"""

from __future__ import annotations

import resource
import sys
import time
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from torch import nn
from typing_extensions import override

from ..distributed.private import precision_compute_dtype
from ..distributed.selection_sync import shards_flat_parameters
from .peak_flops import dense_peak_flops

__all__ = ["EfficiencyMonitor", "training_flops_per_token"]


class EfficiencyMonitor(Callback):
    """Throughput, memory and MFU of training, logged as ``perf/*`` (see the module docstring).

    Works with any LightningModule and any adapter method (or none). Batches are dicts with ``input_ids`` (and
    ``attention_mask``: only its ones count as tokens) or tuples whose first item is the token ids.

    Args:
        log_every_n_steps: logging period in optimizer steps (default: the Trainer's).
        peak_flops: peak FLOP/s of ONE device, for ``perf/mfu``. Default: the datasheet's dense figure for the
            CUDA device at the compute dtype (the module's ``compute_dtype`` if it has one, e.g. FSDP2's bf16
            all-gather under 32-true, else the precision plugin's: bf16-mixed computes in bf16, not in the
            parameters' fp32), Lightning's table as fallback. MFU is not logged when the peak is unknown (CPU).

    Raises:
        ValueError: ``peak_flops`` not a positive number.

    Example::

        trainer = L.Trainer(callbacks=[EffiLoRACallback(keep_ratio=0.5), EfficiencyMonitor()])
    """

    def __init__(self, log_every_n_steps: int | None = None, peak_flops: float | None = None) -> None:
        super().__init__()
        self.log_every_n_steps = log_every_n_steps
        self.peak_flops = check_peak_flops(peak_flops)
        self._meter = _Meter()
        self._step_at_batch_start = -1
        self._flat_shards = False  # FSDP1 sharded: parameter counts are local, summed over ranks

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._meter.peak_flops = self.peak_flops or _device_peak_flops(trainer, pl_module)
        self._flat_shards = shards_flat_parameters(trainer.strategy)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._meter.restart()  # the first window starts with training, not with construction

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._meter.count_batch(batch)
        self._step_at_batch_start = trainer.global_step

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step == self._step_at_batch_start:
            return  # no optimizer step happened in this batch (accumulating)
        self._meter.steps += 1
        every = self.log_every_n_steps or trainer.log_every_n_steps
        if trainer.global_step % every == 0:
            metrics = self._meter.flush(pl_module, self.flops_per_token(pl_module))
            for logger in trainer.loggers:  # straight to the loggers: our period, not the Trainer's
                logger.log_metrics(metrics, step=trainer.global_step)

    def flops_per_token(self, pl_module: nn.Module) -> float:
        """Training FLOPs per token now (a collective under sharded FSDP1: call it on every rank)."""
        flops, self._meter.params_total = training_flops_per_token(pl_module, self._flat_shards,
                                                                   self._meter.params_total)
        return flops


def check_peak_flops(peak_flops: float | None) -> float | None:
    """``peak_flops`` as given, refused unless None or a positive FLOP/s figure."""
    if peak_flops is not None and not peak_flops > 0:
        raise ValueError(f"peak_flops must be a positive FLOP/s figure or None, got {peak_flops}")
    return peak_flops


def training_flops_per_token(pl_module: nn.Module, flat_shards: bool,
                             params_total: int | None = None) -> tuple[float, int]:
    """(FLOPs per trained token, all parameters): 2N forward + 2N activation backward + 2 x trained parameters
    (their weight gradients). ``flat_shards``: each rank counts its FSDP1 slices; a SUM over ranks counts every
    element once. ``params_total`` (constant over a run) is counted when None."""
    local = [sum(p.numel() for p in pl_module.parameters() if p.requires_grad)]
    if params_total is None:
        local.append(sum(p.numel() for p in pl_module.parameters()))
    if flat_shards:
        counts = torch.tensor(local, dtype=torch.float64, device=pl_module.device)
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        local = counts.tolist()
    if params_total is None:
        params_total = int(local[1])
    return 4.0 * params_total + 2.0 * local[0], params_total


class _Meter:
    """Throughput and memory between two log points; token counts stay on the device until then."""

    def __init__(self) -> None:
        self.tokens: torch.Tensor | None = None
        self.samples = 0
        self.steps = 0
        self.t0 = time.perf_counter()
        self.params_total: int | None = None
        self.peak_flops: float | None = None  # per device; None: MFU not logged

    def restart(self) -> None:
        """Begin a new window: nothing counted, the clock at now."""
        self.tokens, self.samples, self.steps, self.t0 = None, 0, 0, time.perf_counter()

    def count_batch(self, batch: Any) -> None:
        ids, mask = _ids_and_mask(batch)
        if ids is None:
            return
        n = mask.sum() if mask is not None else torch.tensor(ids.numel(), device=ids.device)
        self.tokens = n if self.tokens is None else self.tokens + n  # on device: no sync
        self.samples += batch["num_samples"] if isinstance(batch, dict) and "num_samples" in batch else ids.shape[0]

    def flush(self, pl_module: pl.LightningModule, flops_per_token: float) -> dict[str, float]:
        device = pl_module.device
        local = torch.tensor([float(self.tokens) if self.tokens is not None else 0.0, float(self.samples)],
                             device=device, dtype=torch.float64)
        mem = torch.tensor([_peak_memory_mb(device)], device=device, dtype=torch.float64)
        world = 1
        if dist.is_available() and dist.is_initialized():
            world = dist.get_world_size()
            dist.all_reduce(local, op=dist.ReduceOp.SUM)
            dist.all_reduce(mem, op=dist.ReduceOp.MAX)
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        tokens, samples = local.tolist()
        out = {
            "perf/tokens_per_sec": tokens / elapsed,
            "perf/samples_per_sec": samples / elapsed,
            "perf/step_time_sec": elapsed / max(self.steps, 1),
            "perf/peak_memory_mb": float(mem.item()),
        }
        if self.peak_flops:
            out["perf/mfu"] = flops_per_token * tokens / elapsed / (self.peak_flops * world)
        self.restart()
        return out


def _device_peak_flops(trainer: pl.Trainer, pl_module: pl.LightningModule) -> float | None:
    """Peak FLOP/s of one CUDA device at the dtype the matmuls run in; None elsewhere or when unlisted."""
    device = trainer.strategy.root_device
    if device.type != "cuda":
        return None
    dtype = getattr(pl_module, "compute_dtype", None) or precision_compute_dtype(trainer.precision_plugin)
    return dense_peak_flops(torch.cuda.get_device_name(device), dtype, device)


def _ids_and_mask(batch: Any) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if isinstance(batch, dict):
        return batch.get("input_ids"), batch.get("attention_mask")
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0], None
    return None, None


def _peak_memory_mb(device: torch.device) -> float:
    """CUDA peak allocated on GPU, else the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10
