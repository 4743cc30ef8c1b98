"""EffiLoRACallback: each optimizer step, re-rank B importance and train only the selected units.

The B are our EffiLoRA's (``apply_adapter(model, EffiLoRAConfig(...))``) or PEFT LoRA's ``lora_B`` of the active
adapter (``peft.get_peft_model(model, LoraConfig(...))``): ``selectable_units`` finds either. The arithmetic is the
pure-PyTorch ``Reducer`` (selection/reducer.py) with a ``SelectionConfig``; this file drives it from Lightning's
hooks. Throughput, memory and MFU are ``EfficiencyMonitor``'s (monitor.py), for any adapter method.

One optimizer step (see DESIGN.md, "Data flow in one training step"):

    on_train_batch_start     first micro-batch of step s: apply selection S_s (requires_grad on/off)
    forward / backward       frozen B pass activation gradients but get no weight gradient
    on_before_optimizer_step grads complete and reduced: per-unit scores -> all-reduce -> EMA;
                             grad_drop mode drops unselected grads here; decide S_{s+1}
    on_train_batch_end       log active units/params, churn, scores
    on_train_end             every B trainable again: the model leaves as it came

State (EMA, seen units, next selection, step, selection history) is checkpointed and re-applied in
``on_train_start``, because sharded strategies restore callbacks after ``on_fit_start``. The draw is
seeded by (seed, step), so no RNG state needs saving and every rank agrees.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_deprecation, rank_zero_info, rank_zero_only
from torch import nn
from typing_extensions import override

from ..distributed.selection_sync import refuse_compile_and_plain_ddp, score_reducer
from ..selection import SelectableUnits, describe_adapters, has_selectable_units, selectable_units, trained_beside_units
from ..selection.config import SelectionConfig, SelectionValueError
from ..selection.reducer import ImportanceTracker, Reducer
from .heatmap import write_selection_heatmap
from .monitor import check_peak_flops

__all__ = ["EffiLoRACallback"]


class EffiLoRACallback(Callback):
    """Selective B updates for EffiLoRA: drives the paper's Reducer (``Reducer``) from a Lightning run.

    Works with any LightningModule whose model went through ``apply_adapter(model, EffiLoRAConfig(...))`` or
    ``peft.get_peft_model(model, LoraConfig(...))`` (in ``__init__`` or ``configure_model``), with every adapter
    parameter in the optimizer from step 0 (``adapter_parameters(self)``). With PEFT, the units are the active
    adapter's ``lora_B``; lora_A, DoRA's magnitude vectors and ``modules_to_save`` train every step (the log line
    at the start of training lists what trains beside the units). Add ``EfficiencyMonitor()`` for tokens/s,
    memory and MFU.

    The selection settings come as keywords (below, what YAML presets use) or as one typed config:
    ``EffiLoRACallback.from_config(SelectionConfig(...))``; either way ``callback.config`` holds them.

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
        peak_flops: moved to ``EfficiencyMonitor(peak_flops=...)``; still accepted (old YAML), validated, kept as
            ``self.peak_flops``, and otherwise unused here (a deprecation warning says so).

    Raises:
        ValueError: at construction for an argument out of range or an unknown name; in ``setup`` /
            ``on_fit_start`` when the model has neither EffiLoRA modules nor PEFT LoRA layers (naming what it
            has); in ``on_train_start`` when a B is missing from the optimizer (naming it) or a PEFT adapter is
            merged.
        RuntimeError: ``requires_grad`` mode with torch.compile or with DDP without find_unused_parameters.

    Example::

        trainer = L.Trainer(callbacks=[EffiLoRACallback(keep_ratio=0.5), EfficiencyMonitor()])
        trainer = L.Trainer(callbacks=[EffiLoRACallback.from_config(SelectionConfig(keep_ratio=0.5))])
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
        settings = {"keep_ratio": keep_ratio, "importance": importance, "selection": selection,
                    "temperature": temperature, "ema_beta": ema_beta, "warmup_steps": warmup_steps,
                    "every_n_steps": every_n_steps, "granularity": granularity, "freeze_mode": freeze_mode,
                    "frozen_score": frozen_score, "seed": seed}
        try:
            self.config = SelectionConfig(**settings)
        except SelectionValueError as err:
            raise err.named("EffiLoRACallback") from None  # the keywords were the callback's
        self.log_every_n_steps, self.heatmap = log_every_n_steps, heatmap
        self.peak_flops = check_peak_flops(peak_flops)
        if peak_flops is not None:
            rank_zero_deprecation("EffiLoRACallback(peak_flops=...) moved to EfficiencyMonitor(peak_flops=...): "
                                  "throughput, memory and MFU are the monitor's now.")
        self.reducer: Reducer | None = None  # built in on_train_start, once parameters are final
        self._restored: dict[str, Any] | None = None
        self._applied_step = -1  # global_step whose selection is in force (once-per-step guard)
        self._scored_step = -1
        self._all_reduce: Callable[[torch.Tensor], None] | None = None  # bound in on_train_start
        self.description = ""  # the start-of-training log line: units, K, what trains beside the units

    @classmethod
    def from_config(cls, config: SelectionConfig, log_every_n_steps: int | None = None, heatmap: bool = True,
                    peak_flops: float | None = None) -> EffiLoRACallback:
        """The callback for a typed ``config``; the other arguments are the logging ones of ``__init__``."""
        if not isinstance(config, SelectionConfig):
            raise TypeError(f"EffiLoRACallback.from_config needs a SelectionConfig, got {type(config).__name__}.")
        return cls(**dataclasses.asdict(config), log_every_n_steps=log_every_n_steps, heatmap=heatmap,
                   peak_flops=peak_flops)

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
        if self.config.freeze_mode == "requires_grad":
            refuse_compile_and_plain_ddp(trainer, pl_module)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Parameters are final now (sharding replaced them), and a checkpoint, if any, is restored.
        units = selectable_units(pl_module, self.config.granularity)
        _check_in_optimizer(trainer, units)
        self.reducer = Reducer(units, self.config, steps_per_epoch=_optimizer_steps_per_epoch(trainer))
        self._all_reduce = score_reducer(trainer.strategy, units)
        if self._restored:
            self.reducer.load_state_dict(self._restored)
            self._restored = None
        else:
            self.reducer.start(trainer.global_step)
        self._applied_step = -1
        self.description = _describe(self.reducer, trained_beside_units(pl_module, units))
        rank_zero_info(self.description)

    # ---------------------------------------------------------------- the step
    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
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
        every = self.log_every_n_steps or trainer.log_every_n_steps
        if trainer.global_step % every == 0:
            metrics = self._selection_metrics()
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

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Leave the model as it came: every B trainable again (PEFT's print_trainable_parameters, a later fit whose
        # optimizer filters by requires_grad). Checkpoints and exports select adapters by name either way.
        if self.reducer is not None and self.config.freeze_mode == "requires_grad":
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


def _optimizer_steps_per_epoch(trainer: pl.Trainer) -> float:
    """Optimizer steps in one epoch, for a warm-up given as a share (inf for an endless epoch: no warm-up)."""
    return trainer.num_training_batches / trainer.accumulate_grad_batches


def _describe(reducer: Reducer, beside: dict[str, int]) -> str:
    """The start-of-training line: units, K, warm-up, rule, and what trains every step beside the units."""
    cfg, units = reducer.config, reducer.units
    return (
        f"EffiLoRACallback: {units.num_units} units ({cfg.granularity}) of {units.source}, keeping "
        f"{reducer.k} per step after {reducer.warmup_steps} warm-up steps, importance={cfg.importance}, "
        f"selection={cfg.selection}. Trained every step, never selected: "
        + (", ".join(f"{kind} {n:,}" for kind, n in beside.items()) or "nothing") + "."
    )


def _no_units_message(pl_module: nn.Module) -> str:
    return (
        f"EffiLoRACallback found no EffiLoRA modules and no PEFT LoRA layers in {type(pl_module).__name__} (the "
        "adapted model must be an attribute of the LightningModule, adapted in its __init__ or configure_model). "
        + describe_adapters(pl_module)
    )


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
