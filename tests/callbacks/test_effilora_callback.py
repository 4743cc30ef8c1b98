"""EffiLoRACallback on a plain user LightningModule and a tiny LLaMA (CPU, seconds)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from helpers import plain_module, token_loader
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy

from effilora_lightning import EffiLoRACallback, EffiLoRAConfig, LoRAConfig, apply_adapter
from effilora_lightning.callbacks import EfficiencyMonitor
from effilora_lightning.distributed.selection_sync import refuse_compile_and_plain_ddp


def _trainer(callbacks, tmp_path, max_steps=6, **kw):
    kw.setdefault("logger", False)
    kw.setdefault("enable_checkpointing", any(isinstance(c, ModelCheckpoint) for c in callbacks))
    return pl.Trainer(max_steps=max_steps, callbacks=callbacks, accelerator="cpu", devices=1,
                      default_root_dir=tmp_path, enable_progress_bar=False, enable_model_summary=False, **kw)


class Probe(Callback):
    """Records, per micro-batch, the trainable units and which B received a weight gradient."""

    def __init__(self, cb: EffiLoRACallback) -> None:
        self.cb, self.trainable, self.grad_units, self.losses, self.steps = cb, [], [], [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.trainable.append(self.cb.units.trainable().clone())
        self.steps.append(trainer.global_step)

    def on_after_backward(self, trainer, pl_module):
        u = self.cb.units
        has = torch.zeros(u.num_units, dtype=torch.bool)
        for p, i in zip(u.params, u.unit_of_param.tolist()):
            has[i] |= p.grad is not None
        self.grad_units.append(has)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def _fit(tmp_path, max_steps=6, accumulate=1, ckpt_path=None, callbacks=(), module=None, **cb_kw):
    cb_kw.setdefault("warmup_steps", 0)
    cb = EffiLoRACallback(**cb_kw)
    probe = Probe(cb)
    module = module or plain_module(EffiLoRAConfig(rank=4))
    trainer = _trainer([cb, probe, *callbacks], tmp_path, max_steps=max_steps, accumulate_grad_batches=accumulate)
    trainer.fit(module, token_loader(n=16), ckpt_path=ckpt_path)
    return cb, probe, module


def test_exactly_k_units_train_and_selection_holds_across_micro_batches(tmp_path):
    cb, probe, _ = _fit(tmp_path, max_steps=4, accumulate=2, keep_ratio=0.5)
    assert cb.units.num_units == 4
    trainable = torch.stack(probe.trainable)  # (micro-batches, units)
    assert trainable.sum(1).tolist() == [2] * 8
    for a, b in zip(trainable[0::2], trainable[1::2]):  # the two micro-batches of one step agree
        assert torch.equal(a, b)
    assert [s for s in probe.steps] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert len(cb.history) == 4  # selected once per optimizer step, not per micro-batch
    # requires_grad mode: frozen B never get a weight gradient
    assert all(torch.equal(g, t) for g, t in zip(probe.grad_units, probe.trainable))


@pytest.mark.parametrize("keep_ratio, expected", [(0.25, 1), (0.3, 2), (1.0, 4)])
def test_k_is_ceil_of_keep_ratio_times_units(tmp_path, keep_ratio, expected):
    cb, probe, _ = _fit(tmp_path, max_steps=2, keep_ratio=keep_ratio)
    assert {int(t.sum()) for t in probe.trainable} == {expected} == {math.ceil(keep_ratio * 4)}


def test_warmup_trains_every_unit_first(tmp_path):
    cb, probe, _ = _fit(tmp_path, max_steps=5, keep_ratio=0.25, warmup_steps=3)
    assert [int(t.sum()) for t in probe.trainable] == [4, 4, 4, 1, 1]


class FrozenCheck(Callback):
    """Around every optimizer step: unselected B keep value and AdamW state bit-identical."""

    def __init__(self, cb):
        self.cb, self.checked, self.a_changed = cb, 0, []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.optimizer = optimizer
        units = self.cb.units
        sel = self.cb.history[-1]  # the selection that trained in this step
        self.frozen = [p for p, u in zip(units.params, units.unit_of_param.tolist()) if not sel[u]]
        self.before = [(p.detach().clone(), {k: v.clone() for k, v in optimizer.state.get(p, {}).items()})
                       for p in self.frozen]
        a = pl_module.model.effilora_shared_a["q_proj"]
        self.a_before = a.detach().clone()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        for p, (value, state) in zip(self.frozen, self.before):
            assert p.grad is None
            assert torch.equal(p, value)
            now = self.optimizer.state.get(p, {})
            assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)
            self.checked += 1
        self.a_changed.append(not torch.equal(pl_module.model.effilora_shared_a["q_proj"], self.a_before))


@pytest.mark.parametrize("freeze_mode", ["requires_grad", "grad_drop"])
def test_frozen_b_values_and_adamw_state_are_bit_identical(tmp_path, freeze_mode):
    cb = EffiLoRACallback(keep_ratio=0.5, warmup_steps=0, freeze_mode=freeze_mode)
    check = FrozenCheck(cb)
    trainer = _trainer([cb, check], tmp_path, max_steps=5)
    trainer.fit(plain_module(EffiLoRAConfig(rank=4), weight_decay=0.1), token_loader(n=16))
    assert check.checked > 0 and all(check.a_changed)  # shared A trains every step
    if freeze_mode == "grad_drop":
        assert all(p.requires_grad for p in cb.units.params)


def test_selection_is_deterministic_in_seed_and_step(tmp_path):
    h1 = torch.stack(_fit(tmp_path, max_steps=6, seed=3)[0].history)
    h2 = torch.stack(_fit(tmp_path, max_steps=6, seed=3)[0].history)
    h3 = torch.stack(_fit(tmp_path, max_steps=6, seed=4)[0].history)
    assert torch.equal(h1, h2) and not torch.equal(h1, h3)


def test_resume_continues_the_same_selections_and_losses(tmp_path):
    full_cb, full_probe, _ = _fit(tmp_path / "full", max_steps=8)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True, every_n_train_steps=4)
    _fit(tmp_path / "part", max_steps=4, callbacks=[ckpt])  # 16 samples / batch 4: ends at an epoch boundary
    resumed_cb, resumed_probe, _ = _fit(tmp_path / "part", max_steps=8, ckpt_path=str(tmp_path / "ck" / "last.ckpt"))
    assert torch.equal(torch.stack(resumed_cb.history), torch.stack(full_cb.history))
    assert len(resumed_probe.losses) == 4
    for a, b in zip(resumed_probe.losses, full_probe.losses[4:]):
        assert abs(a - b) <= 1e-6
    torch.testing.assert_close(resumed_cb.tracker.ema, full_cb.tracker.ema, rtol=0, atol=1e-9)


def test_logs_throughput_memory_and_selection_and_draws_heatmap(tmp_path):
    logger = pl.loggers.CSVLogger(tmp_path, name="run")
    cb = EffiLoRACallback(warmup_steps=0, log_every_n_steps=2)
    trainer = _trainer([cb, EfficiencyMonitor(log_every_n_steps=2)], tmp_path, max_steps=4, logger=logger)
    trainer.fit(plain_module(EffiLoRAConfig(rank=4)), token_loader(n=16))
    import csv

    rows = list(csv.DictReader(open(f"{logger.log_dir}/metrics.csv")))
    logged = {k for r in rows for k, v in r.items() if v}
    for key in ("effilora/active_units", "effilora/active_b_params", "effilora/churn", "effilora/score_mean",
                "perf/tokens_per_sec", "perf/samples_per_sec", "perf/step_time_sec", "perf/peak_memory_mb"):
        assert key in logged
    steps = [int(r["step"]) for r in rows if r.get("effilora/active_units")]
    assert steps == [2, 4]
    assert {float(r["effilora/active_units"]) for r in rows if r.get("effilora/active_units")} == {2.0}
    from PIL import Image

    img = Image.open(f"{logger.log_dir}/effilora_selection.png")
    assert img.width >= 4 and img.height >= 4


@pytest.mark.parametrize(
    "kwargs, match",
    [({"keep_ratio": 0.0}, "keep_ratio"), ({"keep_ratio": 1.5}, "keep_ratio"), ({"importance": "fisher"}, "importance"),
     ({"selection": "greedy"}, "selection"), ({"temperature": 0.0}, "temperature"), ({"ema_beta": 1.0}, "ema_beta"),
     ({"every_n_steps": 0}, "every_n_steps"), ({"freeze_mode": "zero"}, "freeze_mode")],
)
def test_bad_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EffiLoRACallback(**kwargs)


def test_model_without_effilora_fails_in_setup(tmp_path):
    class Eager(pl.LightningModule):  # adapters applied in __init__: setup can tell at once
        def __init__(self):
            super().__init__()
            from helpers import tiny_llama

            self.model = tiny_llama()
            apply_adapter(self.model, LoRAConfig(rank=2))

        def training_step(self, batch, batch_idx):
            return self.model(**batch, labels=batch["input_ids"]).loss

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad])

    trainer = _trainer([EffiLoRACallback()], tmp_path)
    with pytest.raises(ValueError, match="found no EffiLoRA modules"):
        trainer.fit(Eager(), token_loader())


def test_model_configured_later_without_effilora_fails_before_training(tmp_path):
    trainer = _trainer([EffiLoRACallback()], tmp_path)
    with pytest.raises(ValueError, match="found no EffiLoRA modules"):
        trainer.fit(plain_module(LoRAConfig(rank=2)), token_loader())


def test_b_missing_from_optimizer_is_refused(tmp_path):
    module = plain_module(EffiLoRAConfig(rank=4))
    module.configure_optimizers = lambda: torch.optim.AdamW(
        [p for n, p in module.model.named_parameters() if "shared_a" in n], lr=1e-3)
    trainer = _trainer([EffiLoRACallback()], tmp_path)
    with pytest.raises(ValueError, match="B parameters are not in the optimizer"):
        trainer.fit(module, token_loader())


def test_requires_grad_mode_refuses_compile_and_plain_ddp():
    module = plain_module(EffiLoRAConfig(rank=4))
    module.configure_model()
    plain = SimpleNamespace(strategy=object())
    refuse_compile_and_plain_ddp(plain, module)  # fine as is
    module.compile()  # sets the compiled call without compiling anything yet
    with pytest.raises(RuntimeError, match="cannot run under torch.compile.*grad_drop"):
        refuse_compile_and_plain_ddp(plain, module)
    with pytest.raises(RuntimeError, match="ddp_find_unused_parameters_true"):
        refuse_compile_and_plain_ddp(SimpleNamespace(strategy=DDPStrategy()), plain_module(EffiLoRAConfig(rank=4)))
    refuse_compile_and_plain_ddp(SimpleNamespace(strategy=DDPStrategy(find_unused_parameters=True)),
                                  plain_module(EffiLoRAConfig(rank=4)))
