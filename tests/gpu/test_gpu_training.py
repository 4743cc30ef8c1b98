"""On CUDA, through Lightning's Trainer: EffiLoRACallback's selection and real freezing, EfficiencyMonitor's perf/*
and perf/mfu, and CausalLMModule fitting, validating and generating with a bf16 base (the 8B recipe's dtype and
precision)."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from gpu_helpers import GPU_MARKS, MemoryLogger, dense_bf16_peak
from helpers import plain_module, token_loader
from lightning.pytorch.callbacks import Callback

from effilora_lightning import CausalLMModule, CommonsenseDataModule, EffiLoRACallback, EffiLoRAConfig
from effilora_lightning.callbacks import EfficiencyMonitor

pytestmark = GPU_MARKS

ROOT = Path(__file__).resolve().parents[2]
ACCELERATOR = "gpu"  # the logic runs on "cpu" too (how it was checked without a GPU)
STEPS = 6


class StepProbe(Callback):
    """Per optimizer step, after EffiLoRACallback scored it: which units' B hold a gradient, which B values the
    optimizer then changed, and whether the shared A changed. Listed after the EffiLoRACallback."""

    def __init__(self, cb: EffiLoRACallback) -> None:
        self.cb = cb
        self.grad_units: list[torch.Tensor] = []
        self.changed_units: list[torch.Tensor] = []
        self.a_changed: list[bool] = []
        self.devices: set[str] = set()
        self._before: list[torch.Tensor] = []
        self._a_before: list[torch.Tensor] = []

    def _a(self, pl_module) -> list[torch.Tensor]:
        return [p for n, p in pl_module.named_parameters() if "effilora_shared_a" in n]

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        units = self.cb.units
        has = torch.zeros(units.num_units, dtype=torch.bool)
        for p, u in zip(units.params, units.unit_of_param.tolist()):
            has[u] |= p.grad is not None
            self.devices.add(p.device.type)
        self.grad_units.append(has)
        self._before = [p.detach().clone() for p in units.params]
        self._a_before = [a.detach().clone() for a in self._a(pl_module)]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        units = self.cb.units
        moved = torch.zeros(units.num_units, dtype=torch.bool)
        for p, before, u in zip(units.params, self._before, units.unit_of_param.tolist()):
            moved[u] |= not torch.equal(p.detach(), before)
        self.changed_units.append(moved)
        self.a_changed.append(all(not torch.equal(a.detach(), b) for a, b in zip(self._a(pl_module), self._a_before)))


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A user's LightningModule (tests/helpers.plain_module: 4 layers, EffiLoRA r=4 on every Linear) trained
    STEPS steps with keep_ratio 0.5 under bf16-mixed on one GPU, every step logged."""
    peak = dense_bf16_peak() if ACCELERATOR == "gpu" else 1e12
    cb = EffiLoRACallback(keep_ratio=0.5, warmup_steps=0, log_every_n_steps=1, heatmap=False)
    monitor = EfficiencyMonitor(log_every_n_steps=1, peak_flops=peak)
    probe, logger = StepProbe(cb), MemoryLogger()
    module = plain_module(EffiLoRAConfig(rank=4), layers=4, weight_decay=0.1)
    trainer = pl.Trainer(accelerator=ACCELERATOR, devices=1, precision="bf16-mixed", max_steps=STEPS,
                         callbacks=[cb, monitor, probe], logger=logger, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path_factory.mktemp("fit"))
    trainer.fit(module, token_loader(batch_size=4, n=32))
    return cb, probe, logger, peak


def test_callback_selects_k_units_and_frozen_b_get_no_gradient_and_do_not_move(fitted):
    cb, probe, _, _ = fitted
    assert probe.devices == {"cuda" if ACCELERATOR == "gpu" else "cpu"}
    assert cb.units.num_units == 4 and len(cb.history) == STEPS
    history = torch.stack(cb.history)  # (steps, units): the selection in force at each step
    assert history.sum(1).tolist() == [2] * STEPS
    # really frozen: requires_grad off, so autograd computed no weight gradient for them ...
    assert torch.equal(torch.stack(probe.grad_units), history)
    # ... and AdamW (weight decay 0.1) left them bit-identical, while every selected B moved
    assert torch.equal(torch.stack(probe.changed_units), history)
    assert all(probe.a_changed)  # the shared A trains every step (every layer reads it)


def test_perf_metrics_and_mfu_are_logged_every_step_and_mfu_is_in_0_1(fitted):
    _, _, logger, peak = fitted
    mfu = logger.values("perf/mfu")
    assert len(mfu) == STEPS and all(0.0 < v < 1.0 for v in mfu), mfu
    memory = logger.values("perf/peak_memory_mb")
    assert len(memory) == STEPS and all(v > 0 for v in memory)
    if ACCELERATOR == "gpu":  # torch.cuda.max_memory_allocated of this process: a few MB for this model
        assert max(memory) <= torch.cuda.max_memory_allocated() / 2**20 + 1e-6
    tokens = logger.values("perf/tokens_per_sec")
    assert len(tokens) == STEPS and all(v > 0 for v in tokens)
    assert logger.values("effilora/active_units") == [2.0] * STEPS


def test_default_peak_flops_is_found_for_this_gpu_and_is_the_dense_rate():
    """What EfficiencyMonitor divides by when no peak_flops is given (Lightning's table alone misses the H200)."""
    from effilora_lightning.callbacks.peak_flops import dense_peak_flops

    flops = dense_peak_flops(torch.cuda.get_device_name(0), torch.bfloat16, torch.device("cuda", 0))
    assert flops is not None and flops <= 1.05 * dense_bf16_peak()


def test_causal_lm_with_a_bf16_base_fits_validates_and_generates(tmp_path):
    """CausalLMModule as configs/llama3-8b runs it (bf16 base, fp32 adapters, bf16-mixed) on the bundled tiny
    LLaMA and commonsense data: losses finite, validation loss and accuracy, a per-task test table."""
    data = ROOT / "data" / "datasets" / "commonsense"
    module = CausalLMModule(model_path=str(ROOT / "data" / "checkpoints" / "tiny-llama"), dtype="bfloat16", learning_rate=1e-2,
                            adapter=EffiLoRAConfig(rank=4, target_modules=["q_proj", "v_proj", "down_proj"]),
                            max_new_tokens=4, reducer={"warmup_steps": 0, "heatmap": False, "log_every_n_steps": 1,
                                                       "peak_flops": dense_bf16_peak() if ACCELERATOR == "gpu" else 1e12})
    dm = CommonsenseDataModule(data_path=str(data / "commonsense_170k.json"), dataset_dir=str(data / "dataset"),
                               tokenizer_path=str(ROOT / "data" / "checkpoints" / "tiny-llama"), cutoff_len=96, batch_size=8,
                               eval_batch_size=32, val_set_size=16, val_generation_samples_per_task=2,
                               max_test_samples_per_task=3)
    logger = MemoryLogger()
    trainer = pl.Trainer(accelerator=ACCELERATOR, devices=1, precision="bf16-mixed", max_steps=4, val_check_interval=4,
                         log_every_n_steps=1,
                         check_val_every_n_epoch=None, num_sanity_val_steps=0, logger=logger,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)
    trainer.fit(module, datamodule=dm)
    assert module.model.model.layers[0].self_attn.q_proj.base_layer.weight.dtype == torch.bfloat16
    assert {p.dtype for n, p in module.named_parameters() if "effilora_" in n} == {torch.float32}
    losses = logger.values("train_loss")
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    assert torch.isfinite(torch.tensor(float(trainer.callback_metrics["val_loss"])))
    assert 0.0 <= float(trainer.callback_metrics["val_acc"]) <= 1.0
    assert all(0.0 < v < 1.0 for v in logger.values("perf/mfu"))
    trainer.test(module, datamodule=dm)
    assert set(module.test_results) == set(dm.eval_tasks) | {"average"}
    assert all(0.0 <= v <= 1.0 for v in module.test_results.values())
