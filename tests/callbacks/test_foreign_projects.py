"""EffiLoRACallback in Lightning projects we did not shape: a PEFT LoRA module written as the Lightning docs write a
fine-tuning module around AutoModelForCausalLM, and a user's own module with our EffiLoRA (CPU, seconds each).

Each step, exactly K units' B move; every other B keeps its value, has no gradient and keeps its AdamW state
bit for bit. PEFT's own save_pretrained / from_pretrained / merge_and_unload keep working afterwards.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from helpers import tiny_llama, tiny_llama_config, token_loader
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from effilora_lightning import EffiLoRACallback, EffiLoRAConfig, adapter_parameters, apply_adapter
from effilora_lightning.selection import Reducer, selectable_units

peft = pytest.importorskip("peft")
TARGETS = ["q_proj", "v_proj", "down_proj"]


def lora_config(**kw) -> peft.LoraConfig:
    return peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, **kw)


class LitPeftLM(pl.LightningModule):
    """As Lightning's docs write it: the model built in __init__, ``self.parameters()`` in the optimizer."""

    def __init__(self, lora: peft.LoraConfig | None = None, lr: float = 1e-2) -> None:
        super().__init__()
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_config(tiny_llama_config(layers=4))
        self.model = peft.get_peft_model(base, lora or lora_config())
        self.lr = lr

    def forward(self, **inputs):
        return self.model(**inputs)

    def training_step(self, batch, batch_idx):
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = self(**batch, labels=labels).loss
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.1)


class LitOwnLM(LitPeftLM):
    """A user's own module with our EffiLoRA: injected in configure_model, optimizer over adapter_parameters."""

    def __init__(self, lr: float = 1e-2) -> None:
        pl.LightningModule.__init__(self)
        self.model = None
        self.lr = lr

    def configure_model(self) -> None:
        if self.model is None:
            from transformers import AutoModelForCausalLM

            torch.manual_seed(0)
            self.model = AutoModelForCausalLM.from_config(tiny_llama_config(layers=4))
            apply_adapter(self.model, EffiLoRAConfig(rank=4, target_modules=TARGETS))

    def configure_optimizers(self):
        return torch.optim.AdamW(adapter_parameters(self), lr=self.lr, weight_decay=0.1)


class StepCheck(Callback):
    """Around every optimizer step: exactly the selected units' B move; the others are untouched, state included."""

    def __init__(self, cb: EffiLoRACallback) -> None:
        self.cb, self.moved, self.checked = cb, [], 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        units = self.cb.units
        self.optimizer, self.selected = optimizer, self.cb.history[-1]  # the selection this step trained with
        self.grads = [p.grad is not None for p in units.params]
        self.before = [(p.detach().clone(), {k: v.clone() for k, v in optimizer.state.get(p, {}).items()})
                       for p in units.params]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        units = self.cb.units
        moved = torch.zeros(units.num_units, dtype=torch.bool)
        for p, u, had_grad, (value, state) in zip(units.params, units.unit_of_param.tolist(), self.grads, self.before):
            moved[u] |= not torch.equal(p, value)
            if not self.selected[u]:
                assert not had_grad and p.grad is None
                assert torch.equal(p, value)
                now = self.optimizer.state.get(p, {})
                assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)
                self.checked += 1
        self.moved.append(moved)


def _fit(module, tmp_path, max_steps=5, callbacks=(), ckpt_path=None, **cb_kw):
    cb_kw.setdefault("warmup_steps", 0)
    cb_kw.setdefault("heatmap", False)
    cb = EffiLoRACallback(**cb_kw)
    check = StepCheck(cb)
    trainer = pl.Trainer(max_steps=max_steps, callbacks=[cb, check, *callbacks], accelerator="cpu", devices=1,
                         default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
                         enable_model_summary=False,
                         enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks))
    trainer.fit(module, token_loader(n=16), ckpt_path=ckpt_path)
    return cb, check


def _assert_exactly_k_move(cb: EffiLoRACallback, check: StepCheck, k: int, steps: int) -> None:
    assert len(check.moved) == steps and check.checked > 0
    for moved, selected in zip(check.moved, cb.history, strict=True):
        assert int(selected.sum()) == k
        assert torch.equal(moved, selected)  # the selected units' B all moved, and no other


@pytest.mark.parametrize("freeze_mode", ["requires_grad", "grad_drop"])
def test_peft_lora_project_trains_exactly_k_layers_lora_b_per_step(tmp_path, freeze_mode):
    module = LitPeftLM()
    lora_a = {n: p.detach().clone() for n, p in module.named_parameters() if ".lora_A." in n}
    trainable = module.model.get_nb_trainable_parameters()
    cb, check = _fit(module, tmp_path, freeze_mode=freeze_mode)
    assert module.model.get_nb_trainable_parameters() == trainable  # every lora_B trainable again after fit
    assert cb.units.names == tuple(f"model.base_model.model.model.layers.{i}" for i in range(4))
    assert all(".lora_B.default." in n for n in cb.units.param_names) and len(cb.units.params) == 4 * len(TARGETS)
    _assert_exactly_k_move(cb, check, k=2, steps=5)
    after = dict(module.named_parameters())
    assert all(not torch.equal(after[n], v) for n, v in lora_a.items())  # lora_A trains every step
    assert "PEFT LoRA lora_B of adapter 'default'" in cb.description and "lora_A 2,048" in cb.description
    if freeze_mode == "grad_drop":
        assert all(p.requires_grad for p in cb.units.params)


def test_own_model_with_effilora_trains_exactly_k_layers_b_per_step(tmp_path):
    module = LitOwnLM()
    cb, check = _fit(module, tmp_path)
    assert cb.units.names == tuple(f"model.model.layers.{i}" for i in range(4))
    _assert_exactly_k_move(cb, check, k=2, steps=5)
    assert "EffiLoRA B" in cb.description and "shared A" in cb.description


def test_peft_module_granularity_selects_single_lora_b(tmp_path):
    cb, check = _fit(LitPeftLM(), tmp_path, max_steps=3, granularity="module", keep_ratio=0.25)
    assert cb.units.num_units == 4 * len(TARGETS)
    assert cb.units.names[0] == "model.base_model.model.model.layers.0.self_attn.q_proj"
    _assert_exactly_k_move(cb, check, k=3, steps=3)


def test_peft_resume_continues_the_same_selections_and_losses(tmp_path):
    losses: dict[str, list[float]] = {"full": [], "resumed": []}

    class Losses(Callback):
        def __init__(self, key):
            self.key = key

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses[self.key].append(float(outputs["loss"]))

    full, _ = _fit(LitPeftLM(), tmp_path / "full", max_steps=8, callbacks=[Losses("full")])
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True, every_n_train_steps=4)
    _fit(LitPeftLM(), tmp_path / "part", max_steps=4, callbacks=[ckpt])
    resumed, _ = _fit(LitPeftLM(), tmp_path / "part", max_steps=8, callbacks=[Losses("resumed")],
                      ckpt_path=str(tmp_path / "ck" / "last.ckpt"))
    assert torch.equal(torch.stack(resumed.history), torch.stack(full.history))
    assert len(losses["resumed"]) == 4
    for a, b in zip(losses["resumed"], losses["full"][4:], strict=True):
        assert abs(a - b) <= 1e-6
    torch.testing.assert_close(resumed.tracker.ema, full.tracker.ema, rtol=0, atol=1e-9)


def test_peft_save_pretrained_and_merge_and_unload_still_work(tmp_path):
    module = LitPeftLM()
    _fit(module, tmp_path, max_steps=3)
    trained = module.model.eval()
    ids = torch.randint(1, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = trained(input_ids=ids).logits
    trained.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    fresh = AutoModelForCausalLM.from_config(tiny_llama_config(layers=4))
    loaded = peft.PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    merged = trained.merge_and_unload()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, expected)
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_peft_multiple_adapters_select_the_active_adapters_b_only(tmp_path):
    module = LitPeftLM()
    module.model.add_adapter("second", lora_config())
    module.model.set_adapter("second")
    default_b = {n: p.detach().clone() for n, p in module.named_parameters() if ".lora_B.default." in n}
    cb, check = _fit(module, tmp_path, max_steps=3)
    assert all(".lora_B.second." in n for n in cb.units.param_names) and cb.units.num_units == 4
    assert "adapter 'second'" in cb.description
    _assert_exactly_k_move(cb, check, k=2, steps=3)
    after = dict(module.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in default_b.items())


def test_peft_dora_log_line_says_the_magnitude_vectors_stay_trainable(tmp_path):
    module = LitPeftLM(lora_config(use_dora=True))
    magnitude = {n: p.detach().clone() for n, p in module.named_parameters() if "lora_magnitude_vector" in n}
    cb, check = _fit(module, tmp_path, max_steps=3)
    assert "DoRA magnitude vectors" in cb.description and "stay trainable" in cb.description
    _assert_exactly_k_move(cb, check, k=2, steps=3)
    after = dict(module.named_parameters())
    assert magnitude and all(not torch.equal(after[n], v) for n, v in magnitude.items())


def test_reducer_drives_a_peft_model_in_a_plain_loop():
    """The pure-PyTorch selector, no Lightning: same per-step contract on PEFT's lora_B."""
    model = peft.get_peft_model(tiny_llama(layers=4).train(), lora_config())
    reducer = Reducer(selectable_units(model), keep_ratio=0.25, warmup_steps=0)
    optimizer = torch.optim.AdamW(adapter_parameters(model), lr=1e-2)
    for step, batch in enumerate(token_loader(n=12)):
        reducer.begin_step()
        model(**batch, labels=batch["input_ids"]).loss.backward()
        trained = [p.grad is not None for p in reducer.units.params]
        reducer.end_step(step)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        units_with_grad = reducer.units.unit_of_param[torch.tensor(trained)].unique()
        assert units_with_grad.tolist() == reducer.history[-1].nonzero().flatten().tolist()
        assert len(units_with_grad) == 1


def test_adapter_parameters_holds_frozen_b_and_whatever_else_trains():
    model = tiny_llama()
    apply_adapter(model, EffiLoRAConfig(rank=2, target_modules=TARGETS))
    units = selectable_units(model)
    units.set_trainable([False] * units.num_units)  # as the callback leaves them between steps
    model.lm_head.weight.requires_grad_(True)  # something the user unfroze on purpose
    ids = {id(p) for p in adapter_parameters(model)}
    assert all(id(p) in ids for p in units.params) and id(model.lm_head.weight) in ids
    assert id(model.model.embed_tokens.weight) not in ids
    peft_model = peft.get_peft_model(tiny_llama(), lora_config(modules_to_save=["lm_head"]))
    names = {n for n, p in peft_model.named_parameters() if id(p) in {id(q) for q in adapter_parameters(peft_model)}}
    assert any("modules_to_save" in n for n in names) and any(".lora_B." in n for n in names)


# ------------------------------------------------------------------------------------------------- refusals
class Bare(LitPeftLM):
    def __init__(self, wrap=None) -> None:
        pl.LightningModule.__init__(self)
        self.model = wrap(tiny_llama()) if wrap else tiny_llama()
        self.lr = 1e-2


def _refused(module, tmp_path, match: str) -> str:
    trainer = pl.Trainer(max_steps=1, callbacks=[EffiLoRACallback()], accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match=match) as err:
        trainer.fit(module, token_loader())
    return str(err.value)


def test_model_without_any_adapter_is_refused_saying_what_to_do(tmp_path):
    msg = _refused(Bare(), tmp_path, "found no EffiLoRA modules and no PEFT LoRA layers in Bare")
    assert "no adapter at all" in msg and "get_peft_model(model, LoraConfig" in msg and "EffiLoRAConfig" in msg


@pytest.mark.parametrize("make, found", [
    (lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4), "'default' (PROMPT_TUNING)"),
    (lambda: peft.IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"]), "(IA3)"),
])
def test_peft_without_lora_is_refused_naming_its_type(tmp_path, make, found):
    msg = _refused(Bare(lambda m: peft.get_peft_model(m, make())), tmp_path, "no PEFT LoRA layers")
    assert found in msg and "prompt/prefix tuning, IA3" in msg


def test_our_lora_is_refused_naming_it(tmp_path):
    from effilora_lightning import LoRAConfig

    def ours(model):
        apply_adapter(model, LoRAConfig(rank=2))
        return model

    msg = _refused(Bare(ours), tmp_path, "found no EffiLoRA modules")
    assert "effilora_lightning adapters LoRALinear x4" in msg


def test_peft_b_missing_from_the_optimizer_is_refused_naming_it(tmp_path):
    module = LitPeftLM()
    module.configure_optimizers = lambda: torch.optim.AdamW(
        [p for n, p in module.named_parameters() if ".lora_A." in n], lr=1e-3)
    msg = _refused(module, tmp_path, r"12 of 12 B parameters are not in the optimizer \(PEFT LoRA")
    assert "model.base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight" in msg
    assert "adapter_parameters(self)" in msg


def test_merged_peft_adapter_is_refused(tmp_path):
    module = LitPeftLM()
    module.model.merge_adapter()
    _refused(module, tmp_path, "merged into the base weight.*unmerge_adapter")


def test_ours_and_peft_in_one_model_is_refused():
    model = tiny_llama()
    apply_adapter(model, EffiLoRAConfig(rank=2, target_modules=["q_proj"]))
    model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["down_proj"]))
    with pytest.raises(ValueError, match="both EffiLoRA modules .* and PEFT LoRA layers"):
        selectable_units(model)


def test_peft_lora_on_embeddings_is_a_unit_of_its_own():
    """Found by the same attributes; an embedding belongs to no decoder layer, so it is its own unit."""
    from effilora_lightning.selection import trained_beside_units

    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"]))
    units = selectable_units(model)
    assert units.names == ("base_model.model.model.embed_tokens", "base_model.model.model.layers.0",
                           "base_model.model.model.layers.1")
    assert units.param_names[0] == "base_model.model.model.embed_tokens.lora_embedding_B.default"
    assert units.numel.tolist() == [32 * 2, 32 * 2, 32 * 2]
    assert trained_beside_units(model, units) == {"lora_embedding_A": 2 * 128, "lora_A": 2 * 2 * 32}


def test_peft_lora_bias_belongs_to_its_b_unit():
    model = peft.get_peft_model(tiny_llama(), lora_config(lora_bias=True))
    units = selectable_units(model)
    assert len(units.params) == 2 * 2 * len(TARGETS)  # weight and bias of each lora_B
    assert units.param_names[:2] == ("base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight",
                                     "base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.bias")
    assert units.numel.tolist() == [(32 + 16 + 32) * (4 + 1)] * 2  # out x (r + 1) for q (32), v (16), down (32)
