"""EffiLoRACallback: each optimizer step, re-rank B importance, train only the top units, log the cost.

The B are our EffiLoRA's (``apply_adapter(model, EffiLoRAConfig(...))``) or PEFT LoRA's ``lora_B`` of the active
adapter (``peft.get_peft_model(model, LoraConfig(...))``): ``selectable_units`` finds either.

One optimizer step (see DESIGN.md, "Data flow in one training step"):

    on_train_batch_start     first micro-batch of step s: apply selection S_s (requires_grad on/off)
    forward / backward       frozen B pass activation gradients but get no weight gradient
    on_before_optimizer_step grads complete and reduced: per-unit scores -> all-reduce -> EMA;
                             grad_drop mode drops unselected grads here; decide S_{s+1}
    on_train_batch_end       log active units/params, churn, scores, tokens/s, memory, MFU
    on_train_end             every B trainable again: the model leaves as it came

State (EMA, seen units, next selection, step, selection history) is checkpointed and re-applied in
``on_train_start``, because sharded strategies restore callbacks after ``on_fit_start``. The draw is
seeded by (seed, step), so no RNG state needs saving and every rank agrees.
"""

from __future__ import annotations

import functools
import math
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from torch import nn
from typing_extensions import override

from ..selection import SelectableUnits, describe_adapters, has_selectable_units, selectable_units, trained_beside_units
from ..selection.reducer import FROZEN_SCORE, IMPORTANCE, SELECTION, ImportanceTracker, Reducer
from .heatmap import write_selection_heatmap
from .peak_flops import dense_peak_flops

__all__ = ["EffiLoRACallback"]


class EffiLoRACallback(Callback):
    """Selective B updates for EffiLoRA (the paper's Reducer), plus memory and throughput logging.

    Works with any LightningModule whose model went through ``apply_adapter(model, EffiLoRAConfig(...))`` or
    ``peft.get_peft_model(model, LoraConfig(...))`` (in ``__init__`` or ``configure_model``), with every adapter
    parameter in the optimizer from step 0 (``adapter_parameters(self)``). With PEFT, the units are the active
    adapter's ``lora_B``; lora_A, DoRA's magnitude vectors and ``modules_to_save`` train every step (the log line
    at the start of training lists what trains beside the units).

    Args:
        keep_ratio: share of units trained each step, in (0, 1]; K = ceil(keep_ratio * units).
        importance: ``taylor`` (sum |B * dL/dB|), ``grad_norm``, ``weight_norm`` or ``random``.
        selection: ``sample`` (K units without replacement from softmax(z-scored EMA / temperature)),
            ``topk`` or ``random``.
        temperature: sampling temperature (> 0); lower concentrates on the top units.
        ema_beta: EMA weight of past scores, in [0, 1).
        warmup_steps: optimizer steps during which every unit trains; a float in (0, 1) is a share of
            the first epoch's optimizer steps.
        every_n_steps: re-select every n optimizer steps (the selection holds in between).
        granularity: ``layer`` (all B of a decoder layer form one unit) or ``module`` (each adapted module's B).
        freeze_mode: ``requires_grad`` (frozen B get no weight gradient: saves compute) or ``grad_drop``
            (gradients computed, dropped after reduction: for DDP without find_unused_parameters and
            for torch.compile).
        frozen_score: ``keep`` a frozen unit's EMA, or ``decay`` it by ema_beta each frozen step.
        seed: seeds the per-step draw; with the step it fixes the selection on every rank.
        log_every_n_steps: logging period in optimizer steps (default: the Trainer's).
        heatmap: write ``effilora_selection.png`` (units x steps) into the log directory at the end of fit.
        peak_flops: peak FLOP/s of ONE device, for ``perf/mfu``. Default: Lightning's table for the CUDA
            device at the compute dtype (the module's ``compute_dtype`` if it has one, e.g. FSDP2's bf16
            all-gather under 32-true, else the precision plugin's: bf16-mixed computes in bf16, not in the
            parameters' fp32). MFU is not logged when the peak is unknown (CPU, unlisted GPUs).

    Raises:
        ValueError: at construction for an argument out of range or an unknown name; in ``setup`` /
            ``on_fit_start`` when the model has neither EffiLoRA modules nor PEFT LoRA layers (naming what it
            has); in ``on_train_start`` when a B is missing from the optimizer (naming it) or a PEFT adapter is
            merged.
        RuntimeError: ``requires_grad`` mode with torch.compile or with DDP without find_unused_parameters.

    Example::

        trainer = L.Trainer(callbacks=[EffiLoRACallback(keep_ratio=0.5)])
    """

    def __init__(
        self,
        keep_ratio: float = 0.5,
        importance: Literal["taylor", "grad_norm", "weight_norm", "random"] = "taylor",
        selection: Literal["sample", "topk", "random"] = "sample",
        temperature: float = 1.0,
        ema_beta: float = 0.85,
        warmup_steps: int | float = 0.1,
        every_n_steps: int = 1,
        granularity: Literal["layer", "module"] = "layer",
        freeze_mode: Literal["requires_grad", "grad_drop"] = "requires_grad",
        frozen_score: Literal["keep", "decay"] = "keep",
        seed: int = 0,
        log_every_n_steps: int | None = None,
        heatmap: bool = True,
        peak_flops: float | None = None,
    ) -> None:
        super().__init__()
        _check_args(keep_ratio, importance, selection, temperature, ema_beta, warmup_steps, every_n_steps,
                    granularity, freeze_mode, frozen_score)
        self.keep_ratio, self.importance, self.selection = keep_ratio, importance, selection
        self.temperature, self.ema_beta, self.warmup_steps = temperature, ema_beta, warmup_steps
        self.every_n_steps, self.granularity, self.freeze_mode = every_n_steps, granularity, freeze_mode
        self.frozen_score, self.seed, self.log_every_n_steps, self.heatmap = frozen_score, seed, log_every_n_steps, heatmap
        self.reducer: Reducer | None = None  # built in on_train_start, once parameters are final
        self._restored: dict[str, Any] | None = None
        self._applied_step = -1  # global_step whose selection is in force (once-per-step guard)
        self._scored_step = -1
        self._all_reduce: Callable[[torch.Tensor], None] | None = None  # bound in on_train_start
        self._flat_shards = False
        if peak_flops is not None and not peak_flops > 0:
            raise ValueError(f"peak_flops must be a positive FLOP/s figure or None, got {peak_flops}")
        self.peak_flops = peak_flops
        self._meter = _Meter()
        self.description = ""  # the start-of-training log line: units, K, what trains beside the units

    # Read-only views of the reducer's state (tests and users look at these).
    @property
    def units(self) -> SelectableUnits | None:
        return self.reducer.units if self.reducer else None

    @property
    def tracker(self) -> ImportanceTracker | None:
        return self.reducer.tracker if self.reducer else None

    @property
    def selected(self) -> torch.Tensor | None:
        return self.reducer.selected if self.reducer else None

    @property
    def history(self) -> list[torch.Tensor]:
        return self.reducer.history if self.reducer else []

    # ---------------------------------------------------------------- set-up
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        configured_later = type(pl_module).configure_model is not pl.LightningModule.configure_model
        if not configured_later and not has_selectable_units(pl_module):
            raise ValueError(_no_units_message(pl_module))

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not has_selectable_units(pl_module):
            raise ValueError(_no_units_message(pl_module))
        if self.freeze_mode == "requires_grad":
            _refuse_compile_and_plain_ddp(trainer, pl_module)
        self._meter.peak_flops = self.peak_flops or _device_peak_flops(trainer, pl_module)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Parameters are final now (sharding replaced them), and a checkpoint, if any, is restored.
        units = selectable_units(pl_module, self.granularity)
        _check_in_optimizer(trainer, units)
        self.reducer = Reducer(
            units, self.keep_ratio, self.importance, self.selection, self.temperature, self.ema_beta,
            self._resolve_warmup(trainer), self.every_n_steps, self.freeze_mode, self.frozen_score, self.seed,
        )
        sharded = _shards_adapters(trainer, units)
        self._all_reduce = functools.partial(_all_reduce, sharded=sharded)
        self._flat_shards = sharded and not hasattr(units.params[0], "to_local")  # FSDP1: local numel() only
        if self._restored:
            self.reducer.load_state_dict(self._restored)
            self._restored = None
        else:
            self.reducer.selected = self.reducer.decide(trainer.global_step)
        self._applied_step = -1
        beside = trained_beside_units(pl_module, units)
        self.description = (
            f"EffiLoRACallback: {units.num_units} units ({self.granularity}) of {units.source}, keeping "
            f"{self.reducer.k} per step after {self.reducer.warmup_steps} warm-up steps, importance={self.importance}, "
            f"selection={self.selection}. Trained every step, never selected: "
            + (", ".join(f"{kind} {n:,}" for kind, n in beside.items()) or "nothing") + "."
        )
        rank_zero_info(self.description)

    def _resolve_warmup(self, trainer: pl.Trainer) -> int:
        if isinstance(self.warmup_steps, int):
            return self.warmup_steps
        batches = trainer.num_training_batches
        steps = batches / trainer.accumulate_grad_batches if math.isfinite(batches) else 0
        return int(self.warmup_steps * steps)

    # ---------------------------------------------------------------- the step
    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._meter.count_batch(batch)
        if trainer.global_step == self._applied_step:
            return  # not the first micro-batch of this optimizer step
        self._applied_step = trainer.global_step
        self.reducer.begin_step()

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if trainer.global_step == self._scored_step:
            return  # a second optimizer in the same step: score once
        self._scored_step = trainer.global_step
        self.reducer.end_step(trainer.global_step, self._all_reduce)

    # ---------------------------------------------------------------- logging
    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step == self._applied_step:
            return  # no optimizer step happened in this batch (accumulating)
        self._meter.steps += 1
        every = self.log_every_n_steps or trainer.log_every_n_steps
        if trainer.global_step % every == 0:
            metrics = self._meter.flush(pl_module, self._flops_per_token(pl_module))
            metrics.update(self._selection_metrics())
            for logger in trainer.loggers:  # straight to the loggers: our period, not the Trainer's
                logger.log_metrics(metrics, step=trainer.global_step)

    def _selection_metrics(self) -> dict[str, float]:
        """Units and B parameters trained in the last step, churn against the step before, EMA spread."""
        last = self.history[-1] if self.history else self.selected
        churn = float((self.history[-1] != self.history[-2]).sum()) if len(self.history) > 1 else 0.0
        ema = self.tracker.ema
        return {
            "effilora/active_units": float(last.sum()),
            "effilora/active_b_params": float(self.units.numel[last].sum()),
            "effilora/churn": churn,
            "effilora/score_mean": float(ema.mean()),
            "effilora/score_max": float(ema.max()),
            "effilora/score_min": float(ema.min()),
        }

    def _flops_per_token(self, pl_module: nn.Module) -> float:
        """Training FLOPs per token: 2N forward + 2N activation backward + 2 x trained params (weight grads)."""
        local = [sum(p.numel() for p in pl_module.parameters() if p.requires_grad)]
        if self._meter.params_total is None:
            local.append(sum(p.numel() for p in pl_module.parameters()))
        if self._flat_shards:  # FSDP1: each rank counts its flat slices; together they are every element once
            counts = torch.tensor(local, dtype=torch.float64, device=pl_module.device)
            dist.all_reduce(counts, op=dist.ReduceOp.SUM)
            local = counts.tolist()
        if self._meter.params_total is None:
            self._meter.params_total = int(local[1])
        return 4.0 * self._meter.params_total + 2.0 * local[0]

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Leave the model as it came: every B trainable again (PEFT's print_trainable_parameters, a later fit whose
        # optimizer filters by requires_grad). Checkpoints and exports select adapters by name either way.
        if self.reducer is not None and self.freeze_mode == "requires_grad":
            self.units.set_trainable(torch.ones(self.units.num_units, dtype=torch.bool))

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.heatmap and self.history:
            # every rank asks: Trainer.log_dir broadcasts rank 0's answer (a rank-0-only call would hang)
            self._write_heatmap(Path(trainer.log_dir or trainer.default_root_dir) / "effilora_selection.png")

    @rank_zero_only
    def _write_heatmap(self, out: Path) -> None:
        write_selection_heatmap(torch.stack(self.history), list(self.units.names), out)
        rank_zero_info(f"EffiLoRACallback: selection heatmap written to {out}")

    # ---------------------------------------------------------------- checkpoint
    @override
    def state_dict(self) -> dict[str, Any]:
        return self.reducer.state_dict() if self.reducer is not None else {}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = dict(state_dict) if state_dict else None  # applied in on_train_start


def _no_units_message(pl_module: nn.Module) -> str:
    return (
        f"EffiLoRACallback found no EffiLoRA modules and no PEFT LoRA layers in {type(pl_module).__name__} (the "
        "adapted model must be an attribute of the LightningModule, adapted in its __init__ or configure_model). "
        + describe_adapters(pl_module)
    )


def _all_reduce(scores: torch.Tensor, sharded: bool) -> None:
    """Shards hold parts of each B (SUM completes the score); replicas hold copies (AVG keeps it)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(scores, op=dist.ReduceOp.SUM)
        if not sharded:
            scores.div_(dist.get_world_size())


def _shards_adapters(trainer: pl.Trainer, units: SelectableUnits) -> bool:
    """Whether each rank holds a different part of the B: FSDP2 (DTensor parameters) or FSDP1 with any sharding
    but NO_SHARD (its use_orig_params views are flat slices). Under hybrid sharding the SUM counts each shard
    once per replica group: a uniform factor, which neither top-k nor the z-scored sampling sees."""
    if hasattr(units.params[0], "to_local"):
        return True
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import ShardingStrategy

    strategy = trainer.strategy
    return isinstance(strategy, FSDPStrategy) and strategy.sharding_strategy != ShardingStrategy.NO_SHARD


def _check_in_optimizer(trainer: pl.Trainer, units: SelectableUnits) -> None:
    in_opt = {id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}
    missing = [j for j, p in enumerate(units.params) if id(p) not in in_opt]
    if missing:
        named = [units.param_names[j] for j in missing[:3]] if units.param_names else []
        example = f" (e.g. {', '.join(named)})" if named else ""
        raise ValueError(
            f"{len(missing)} of {len(units.params)} B parameters are not in the optimizer ({units.source}){example}. "
            "Put every adapter parameter in the optimizer from step 0, selected by name, not by requires_grad: "
            "`torch.optim.AdamW(adapter_parameters(self), ...)` (from effilora_lightning import adapter_parameters). "
            "The callback toggles requires_grad every step and never adds param groups."
        )


def _refuse_compile_and_plain_ddp(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    compiled = getattr(pl_module, "_compiler_ctx", None) or getattr(pl_module, "_compiled_call_impl", None)
    if compiled:
        raise RuntimeError(
            "EffiLoRACallback(freeze_mode='requires_grad') cannot run under torch.compile: compiled graphs do not "
            "guard on requires_grad, so toggled B would silently stop training. Use freeze_mode='grad_drop'."
        )
    from lightning.pytorch.strategies import DDPStrategy

    strategy = trainer.strategy
    if isinstance(strategy, DDPStrategy) and not strategy._ddp_kwargs.get("find_unused_parameters", False):
        raise RuntimeError(
            "EffiLoRACallback(freeze_mode='requires_grad') under DDP needs find_unused_parameters: use "
            "strategy='ddp_find_unused_parameters_true', or freeze_mode='grad_drop'."
        )


class _Meter:
    """Throughput and memory between two log points; token counts stay on the device until then."""

    def __init__(self) -> None:
        self.tokens: torch.Tensor | None = None
        self.samples = 0
        self.steps = 0
        self.t0 = time.perf_counter()
        self.params_total: int | None = None
        self.peak_flops: float | None = None  # per device; None: MFU not logged

    def count_batch(self, batch: Any) -> None:
        ids, mask = _ids_and_mask(batch)
        if ids is None:
            return
        n = mask.sum() if mask is not None else torch.tensor(ids.numel(), device=ids.device)
        self.tokens = n if self.tokens is None else self.tokens + n  # on device: no sync
        self.samples += ids.shape[0]

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
        self.tokens, self.samples, self.steps, self.t0 = None, 0, 0, time.perf_counter()
        return out


def _device_peak_flops(trainer: pl.Trainer, pl_module: pl.LightningModule) -> float | None:
    """Peak FLOP/s of one CUDA device at the dtype the matmuls run in; None elsewhere or when unlisted."""
    device = trainer.strategy.root_device
    if device.type != "cuda":
        return None
    from lightning.pytorch.callbacks.throughput_monitor import _plugin_to_compute_dtype

    dtype = getattr(pl_module, "compute_dtype", None) or _plugin_to_compute_dtype(trainer.precision_plugin)
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


def _check_args(keep_ratio: float, importance: str, selection: str, temperature: float, ema_beta: float,
                warmup_steps: int | float, every_n_steps: int, granularity: str, freeze_mode: str,
                frozen_score: str) -> None:
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"EffiLoRACallback(keep_ratio={keep_ratio}): must be in (0, 1].")
    for name, value, allowed in (("importance", importance, IMPORTANCE), ("selection", selection, SELECTION),
                                 ("granularity", granularity, ("layer", "module")),
                                 ("freeze_mode", freeze_mode, ("requires_grad", "grad_drop")),
                                 ("frozen_score", frozen_score, FROZEN_SCORE)):
        if value not in allowed:
            raise ValueError(f"EffiLoRACallback({name}={value!r}): must be one of {allowed}.")
    if not temperature > 0:
        raise ValueError(f"EffiLoRACallback(temperature={temperature}): must be > 0.")
    if not 0.0 <= ema_beta < 1.0:
        raise ValueError(f"EffiLoRACallback(ema_beta={ema_beta}): must be in [0, 1).")
    if warmup_steps < 0 or (isinstance(warmup_steps, float) and warmup_steps >= 1.0):
        raise ValueError(f"EffiLoRACallback(warmup_steps={warmup_steps}): an int >= 0, or a float share in [0, 1).")
    if every_n_steps < 1:
        raise ValueError(f"EffiLoRACallback(every_n_steps={every_n_steps}): must be >= 1.")
