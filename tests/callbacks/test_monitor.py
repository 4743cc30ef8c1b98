"""EfficiencyMonitor: perf/* for any adapter method, non-padding tokens only, MFU at the compute dtype (CPU)."""

from __future__ import annotations

import csv
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from helpers import plain_module, token_loader

from effilora_lightning import EffiLoRACallback, EffiLoRAConfig, LoRAConfig
from effilora_lightning.callbacks import EfficiencyMonitor
from effilora_lightning.callbacks.monitor import _Meter, training_flops_per_token

PERF = ("perf/tokens_per_sec", "perf/samples_per_sec", "perf/step_time_sec", "perf/peak_memory_mb")


def test_lora_run_logs_perf_at_the_monitors_period(tmp_path):
    logger = pl.loggers.CSVLogger(tmp_path, name="run")
    trainer = pl.Trainer(max_steps=6, accumulate_grad_batches=2, callbacks=[EfficiencyMonitor(log_every_n_steps=3)],
                         logger=logger, accelerator="cpu", devices=1, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(plain_module(LoRAConfig(rank=2)), token_loader(n=48))
    rows = [r for r in csv.DictReader(open(f"{logger.log_dir}/metrics.csv")) if r.get("perf/tokens_per_sec")]
    assert [int(r["step"]) for r in rows] == [3, 6]  # optimizer steps, not micro-batches
    assert all(float(r[k]) > 0 for r in rows for k in PERF)
    assert "perf/mfu" not in rows[0] or not rows[0]["perf/mfu"]  # CPU: no peak, no MFU


def test_the_selection_callback_alone_logs_selection_only(tmp_path):
    logger = pl.loggers.CSVLogger(tmp_path, name="run")
    trainer = pl.Trainer(max_steps=2, callbacks=[EffiLoRACallback(warmup_steps=0, log_every_n_steps=1, heatmap=False)],
                         logger=logger, accelerator="cpu", devices=1, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(plain_module(EffiLoRAConfig(rank=4)), token_loader(n=8))
    logged = {k for r in csv.DictReader(open(f"{logger.log_dir}/metrics.csv")) for k, v in r.items() if v}
    assert "effilora/active_units" in logged and not any(k.startswith("perf/") for k in logged)


def test_meter_counts_non_padding_tokens_only():
    meter = _Meter()
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    meter.count_batch({"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": mask})
    meter.count_batch({"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": mask})
    assert int(meter.tokens) == 10 and meter.samples == 4


def test_flops_per_token_is_4n_plus_2_trained():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))  # 16 + 10 parameters
    model[0].requires_grad_(False)
    module = SimpleNamespace(parameters=model.parameters, device=torch.device("cpu"))
    assert training_flops_per_token(module, flat_shards=False) == (4.0 * 26 + 2.0 * 10, 26)
    assert training_flops_per_token(module, flat_shards=False, params_total=100) == (4.0 * 100 + 2.0 * 10, 100)


def test_mfu_uses_the_given_peak_and_equals_flops_times_tokens_per_second():
    meter = _Meter()
    meter.peak_flops = 1e9
    meter.count_batch({"input_ids": torch.ones(2, 8, dtype=torch.long)})
    module = SimpleNamespace(device=torch.device("cpu"))
    out = meter.flush(module, flops_per_token=1000.0)
    assert out["perf/mfu"] == pytest.approx(1000.0 * out["perf/tokens_per_sec"] / 1e9, rel=1e-12)
    meter.peak_flops = None  # unknown peak (CPU): no MFU rather than a made-up one
    meter.count_batch({"input_ids": torch.ones(2, 8, dtype=torch.long)})
    assert "perf/mfu" not in meter.flush(module, flops_per_token=1000.0)
    with pytest.raises(ValueError, match="peak_flops"):
        EfficiencyMonitor(peak_flops=0)
    with pytest.raises(ValueError, match="peak_flops"):
        EffiLoRACallback(peak_flops=0)  # still refused where it was accepted before
    with pytest.deprecated_call(match="moved to EfficiencyMonitor"):
        assert EffiLoRACallback(peak_flops=1e12).peak_flops == 1e12


@pytest.mark.parametrize(("precision", "compute_dtype", "expected"), [
    ("bf16-mixed", None, torch.bfloat16),       # parameters stay fp32; the matmuls run in bf16
    ("32-true", None, torch.float32),
    ("32-true", torch.bfloat16, torch.bfloat16),  # FSDP2 all-gathering in bf16 (CausalLMModule.compute_dtype)
])
def test_mfu_peak_is_looked_up_at_the_compute_dtype(monkeypatch, precision, compute_dtype, expected):
    from lightning.pytorch.plugins import MixedPrecision, Precision

    from effilora_lightning.callbacks import monitor as module

    seen = []
    monkeypatch.setattr(module, "dense_peak_flops", lambda name, dtype, device: seen.append(dtype) or 1e15)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    plugin = MixedPrecision("bf16-mixed", "cuda") if precision == "bf16-mixed" else Precision()
    trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cuda", 0)), precision_plugin=plugin)
    assert module._device_peak_flops(trainer, SimpleNamespace(compute_dtype=compute_dtype)) == 1e15
    assert seen == [expected]
    cpu = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu")), precision_plugin=plugin)
    assert module._device_peak_flops(cpu, SimpleNamespace()) is None


def test_dense_peak_flops_knows_the_h200_by_the_name_it_reports():
    """Lightning's table misses "NVIDIA H200" and lists the 2:4-sparse rate; ours is the datasheet's dense one."""
    from effilora_lightning.callbacks.peak_flops import dense_peak_flops

    assert dense_peak_flops("NVIDIA H200", torch.bfloat16) == 989.4e12
    assert dense_peak_flops("NVIDIA H200 NVL", torch.bfloat16) == 835e12
    assert dense_peak_flops("NVIDIA H100 80GB HBM3", torch.float32) == 66.9e12
    assert dense_peak_flops("Some Future GPU", torch.bfloat16) is None  # and Lightning's table when given the device
