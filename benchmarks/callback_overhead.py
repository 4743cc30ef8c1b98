"""How much of a training step EffiLoRACallback and EfficiencyMonitor cost: time inside their hooks over the step.

    .venv/bin/python benchmarks/callback_overhead.py [--steps 60] [--model data/checkpoints/tiny-llama]

Trains the demo's model shape (data/checkpoints/tiny-llama if present, else the same shape from a config) with the
demo's EffiLoRA adapter and batch (16 x 128 tokens) on CPU, wraps each hook of the two callbacks the module adds
(the selection and the perf/* monitor) in a timer, and prints hook time / step time. Steps, not wall time of the whole run, so start-up does not count.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from effilora_lightning import CausalLMModule, EffiLoRAConfig

HOOKS = ("on_train_batch_start", "on_before_optimizer_step", "on_train_batch_end")


class StepTimer(Callback):
    """Wall time per training batch (first hook to last hook)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, *args) -> None:
        self.t0 = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        self.times.append(time.perf_counter() - self.t0)


def _timed(cb: Callback, totals: dict[str, list[float]]) -> None:
    for name in HOOKS:
        original = getattr(cb, name)
        key = f"{type(cb).__name__}.{name}"
        totals[key] = []

        def wrapper(*args, _f=original, _n=key, **kw):
            t = time.perf_counter()
            _f(*args, **kw)
            totals[_n].append(time.perf_counter() - t)

        setattr(cb, name, wrapper)


def _time_added_callbacks(module: CausalLMModule, totals: dict[str, list[float]]) -> None:
    """Wrap the hooks of every callback the module adds (configure_callbacks runs when fit starts)."""
    configure = module.configure_callbacks

    def configure_timed() -> list[Callback]:
        callbacks = configure()
        for cb in callbacks:
            _timed(cb, totals)
        return callbacks

    module.configure_callbacks = configure_timed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--model", default="data/checkpoints/tiny-llama")
    args = ap.parse_args()
    torch.manual_seed(0)
    model_kw = {"model_path": args.model} if Path(args.model, "config.json").is_file() else {"model_config": {
        "model_type": "llama", "vocab_size": 1024, "hidden_size": 128, "intermediate_size": 384,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2}}
    module = CausalLMModule(adapter=EffiLoRAConfig(rank=8, alpha=16, target_modules=["q_proj", "k_proj", "v_proj",
                            "up_proj", "down_proj"]), reducer={"keep_ratio": 0.5, "warmup_steps": 0,
                            "log_every_n_steps": 10, "heatmap": False}, **model_kw)
    totals: dict[str, list[float]] = {}
    _time_added_callbacks(module, totals)
    timer = StepTimer()
    ids = torch.randint(3, 800, (16 * args.steps, 128))
    data = [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x} for x in ids]
    trainer = pl.Trainer(max_steps=args.steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[timer])
    trainer.fit(module, DataLoader(data, batch_size=16))
    skip = 5  # warm-up steps
    step = statistics.median(timer.times[skip:])
    hooks = sum(statistics.median(v[skip:]) for v in totals.values())
    print(f"median step {step * 1e3:.1f} ms; callback hooks {hooks * 1e3:.3f} ms per step "
          f"({100 * hooks / step:.2f} % of a step); " +
          ", ".join(f"{k} {statistics.median(v[skip:]) * 1e3:.3f} ms" for k, v in totals.items()))


if __name__ == "__main__":
    main()
