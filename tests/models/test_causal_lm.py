"""CausalLMModule on the bundled tiny LLaMA: loading, optimizer groups, checkpoints, generation accuracy."""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from effilora_lightning import CausalLMModule, CommonsenseDataModule, EffiLoRAConfig, LoRAConfig, apply_adapter
from effilora_lightning.adapters import is_adapter_param
from effilora_lightning.models import optim

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "data" / "checkpoints" / "tiny-llama"
DATA = ROOT / "data" / "datasets" / "commonsense"


def _module(**kw) -> CausalLMModule:
    kw.setdefault("adapter", EffiLoRAConfig(rank=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    return CausalLMModule(model_path=str(TINY), **kw)


def _datamodule(**kw) -> CommonsenseDataModule:
    args = dict(data_path=str(DATA / "commonsense_170k.json"), dataset_dir=str(DATA / "dataset"),
                tokenizer_path=str(TINY), cutoff_len=96, batch_size=8, eval_batch_size=32, val_set_size=16,
                val_generation_samples_per_task=2, max_test_samples_per_task=3)
    args.update(kw)
    return CommonsenseDataModule(**args)


def _trainer(tmp_path, **kw) -> pl.Trainer:
    kw.setdefault("logger", False)
    kw.setdefault("enable_checkpointing", False)
    return pl.Trainer(accelerator="cpu", devices=1, default_root_dir=tmp_path, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, **kw)


def test_missing_model_directory_names_the_path_and_never_downloads(tmp_path):
    module = CausalLMModule(adapter=LoRAConfig(), model_path=str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match=r"No model at .*nope .*no download is attempted"):
        module.configure_model()


def test_needs_a_model_source_and_an_adapter_config():
    with pytest.raises(ValueError, match="model_path"):
        CausalLMModule(adapter=LoRAConfig())
    with pytest.raises(TypeError, match="adapter must be an adapter config"):
        CausalLMModule(adapter={"rank": 4}, model_path=str(TINY))


def test_loads_local_checkpoint_and_injects_in_train_mode():
    module = _module()
    module.configure_model()
    module.configure_model()  # a second call is a no-op
    assert module.model.training
    assert module.adapter_report.trainable == sum(
        p.numel() for n, p in module.named_parameters() if is_adapter_param(n))
    assert all(not p.requires_grad for n, p in module.named_parameters() if not is_adapter_param(n))


def test_optimizer_groups_hold_every_adapter_parameter_with_their_own_lr(tmp_path):
    module = _module(learning_rate=1e-3, lr_shared_a=5e-4, lr_b=2e-3, weight_decay=0.1)
    module.configure_model()
    for name, p in module.named_parameters():  # a frozen B must be in the optimizer too
        if "effilora_B" in name:
            p.requires_grad_(False)
    groups = {g["name"]: g for g in module.param_groups()}
    assert set(groups) == {"shared_a", "b"}
    assert groups["shared_a"]["lr"] == 5e-4 and groups["b"]["lr"] == 2e-3
    in_groups = {id(p) for g in groups.values() for p in g["params"]}
    assert in_groups == {id(p) for n, p in module.named_parameters() if is_adapter_param(n)}


def test_checkpoint_holds_adapter_weights_only_and_restores_them(tmp_path):
    module = _module(adapter=LoRAConfig(rank=4))
    trainer = _trainer(tmp_path, max_steps=2, limit_val_batches=0)
    trainer.fit(module, datamodule=_datamodule())
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=False)["state_dict"]
    assert state and all(is_adapter_param(k) for k in state)
    fresh = _module(adapter=LoRAConfig(rank=4))
    fresh.configure_model()
    fresh.load_state_dict(state, strict=False)
    for name, p in module.named_parameters():
        if is_adapter_param(name):
            assert torch.equal(p, dict(fresh.named_parameters())[name])


def test_fit_then_test_reports_accuracy_per_task(tmp_path, capsys):
    module = _module(learning_rate=1e-3, max_new_tokens=4, reducer={"warmup_steps": 0, "heatmap": False})
    dm = _datamodule()
    trainer = _trainer(tmp_path, max_steps=3, val_check_interval=3, check_val_every_n_epoch=None,
                       logger=pl.loggers.CSVLogger(tmp_path, name="t"))
    trainer.fit(module, datamodule=dm)
    assert "val_acc" in trainer.callback_metrics and "val_loss" in trainer.callback_metrics
    trainer.test(module, datamodule=dm)
    results = module.test_results
    assert set(results) == set(dm.eval_tasks) | {"average"}
    assert all(0.0 <= v <= 1.0 for v in results.values())
    out = capsys.readouterr().out
    assert "| average |" in out and "| boolq |" in out
    assert (Path(trainer.log_dir) / "test_results.json").is_file()


def test_generation_scores_the_first_regex_match_against_the_answer():
    module = _module()
    module.configure_model()
    module.generate_answers = lambda batch: ["the correct answer is true", "solution2 solution1", "nothing"]
    from effilora_lightning.metrics import TaskAccuracy

    metric = TaskAccuracy(["boolq", "piqa"])
    batch = {"task": ["boolq", "piqa", "piqa"], "answer": ["true", "solution1", "solution1"],
             "sample_id": torch.tensor([0, 1, 2])}
    module.score(batch, metric)
    assert {k: float(v) for k, v in metric.compute().items()} == {"boolq": 1.0, "piqa": 0.0, "average": 0.5}


class _Losses(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


class _KillAt(pl.Callback):
    """Stops the run after ``step`` optimizer steps, as a kill would (the schedule still plans for max_steps)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:  # the step-``step`` checkpoint is written by now
            raise KeyboardInterrupt


def _fit_steps(tmp_path, steps, ckpt_path=None, every=None, kill_at=None, **module_kw):
    from lightning.pytorch.callbacks import ModelCheckpoint

    module = _module(learning_rate=1e-3, warmup_steps=2, reducer={"warmup_steps": 0, "heatmap": False}, **module_kw)
    losses = _Losses()
    callbacks = [losses] + ([_KillAt(kill_at)] if kill_at else [])
    if every:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=every, save_top_k=-1))
    trainer = _trainer(tmp_path, max_steps=steps, limit_val_batches=0, callbacks=callbacks,
                       enable_checkpointing=bool(every))
    if kill_at:  # Lightning turns the interrupt into SystemExit after its graceful shutdown
        with pytest.raises(SystemExit):
            trainer.fit(module, datamodule=_datamodule(val_set_size=0), ckpt_path=ckpt_path)
    else:
        trainer.fit(module, datamodule=_datamodule(val_set_size=0), ckpt_path=ckpt_path)
    return losses.losses, module.reducer.history, trainer


def test_mid_epoch_resume_continues_the_same_data_order_losses_and_selections(tmp_path):
    full_losses, full_history, _ = _fit_steps(tmp_path / "full", 6)
    _fit_steps(tmp_path / "part", 6, every=3, kill_at=3)  # killed after step 3, mid-epoch (hundreds of batches)
    ckpt = next((tmp_path / "part" / "ck").glob("*step=3*"))
    losses, history, _ = _fit_steps(tmp_path / "resumed", 6, ckpt_path=str(ckpt))
    assert len(losses) == 3
    for a, b in zip(losses, full_losses[3:]):
        assert abs(a - b) <= 1e-6, (losses, full_losses)
    assert [h.tolist() for h in history] == [h.tolist() for h in full_history]


def test_a_resume_keeps_the_adamw_implementation_the_checkpoint_was_written_with_and_says_so(tmp_path):
    """A run written by the for loop (as every run before 2026-12-05) resumes with the for loop under today's
    fused default: its losses are the uninterrupted for-loop run's to the bit, and a warning names both."""
    full_losses, _, _ = _fit_steps(tmp_path / "full", 6, adamw_implementation="for_loop")
    _fit_steps(tmp_path / "part", 6, every=3, kill_at=3, adamw_implementation="for_loop")
    ckpt = next((tmp_path / "part" / "ck").glob("*step=3*"))
    with pytest.warns(UserWarning, match=r"checkpoint's AdamW implementation, for_loop, .*"
                                         r"adamw_implementation='fused' applies to runs that start without"):
        losses, _, trainer = _fit_steps(tmp_path / "resumed", 6, ckpt_path=str(ckpt))
    group = trainer.optimizers[0].param_groups[0]
    assert (group["foreach"], group["fused"]) == (False, False)
    assert losses == full_losses[3:]
    old = {"optimizer_states": [{"param_groups": [{"foreach": None, "fused": None}]}]}  # written before the choice
    assert optim.resumed_implementation(old, "fused").startswith("torch's default")
    assert optim.resumed_implementation({"optimizer_states": [{"param_groups": [{"fused": True}]}]}, "fused") is None
    assert optim.resumed_implementation({}, "fused") is None  # validate / test: no optimizer state


@pytest.mark.parametrize(("strategy", "keeps_base"), [
    ("lightning_sharded", True),  # Lightning's own loader reloads every key: keep the base shards
    ("lightning_single_file", False),
    ("adapter_sharded", False),
    ("adapter_single_file", False),
])
def test_checkpoint_keeps_base_weights_only_for_lightning_model_parallel_shards(strategy, keeps_base):
    from types import SimpleNamespace

    from lightning.pytorch.strategies import ModelParallelStrategy

    from effilora_lightning.strategies import AdapterModelParallelStrategy

    kind, layout = strategy.split("_", 1)
    cls = ModelParallelStrategy if kind == "lightning" else AdapterModelParallelStrategy
    module = _module()
    module.configure_model()
    module._trainer = SimpleNamespace(strategy=cls(save_distributed_checkpoint=layout == "sharded"))
    state = module.state_dict()
    checkpoint = {"state_dict": dict(state)}
    module.on_save_checkpoint(checkpoint)
    adapter = {k for k in state if is_adapter_param(k)}
    assert set(checkpoint["state_dict"]) == (set(state) if keeps_base else adapter)
    assert adapter and all(module.in_checkpoint(k) == (k in adapter) for k in state)


def test_lightning_model_parallel_with_shards_warns_to_use_the_adapter_strategy():
    from types import SimpleNamespace

    from lightning.pytorch.strategies import ModelParallelStrategy

    from effilora_lightning.strategies import AdapterModelParallelStrategy

    module = _module()
    module._trainer = SimpleNamespace(strategy=ModelParallelStrategy(save_distributed_checkpoint=True))
    with pytest.warns(UserWarning, match="effilora_lightning.strategies.AdapterModelParallelStrategy"):
        module._check_strategy()
    module._trainer = SimpleNamespace(strategy=AdapterModelParallelStrategy(save_distributed_checkpoint=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module._check_strategy()


@pytest.mark.parametrize(("kwargs", "error"), [
    ({"use_orig_params": False}, "use_orig_params"),  # frozen base and trainable adapters share FSDP1 units
    ({"use_orig_params": True, "state_dict_type": "sharded"}, "state_dict_type='sharded'"),
    ({}, None),  # Lightning's defaults: use_orig_params, full state dict (one adapter-only file)
])
def test_fsdp1_is_refused_at_start_where_it_cannot_train_or_resume(kwargs, error):
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    module = _module()
    module._trainer = SimpleNamespace(strategy=FSDPStrategy(**kwargs))
    if error is None:
        module._check_strategy()
        return
    with pytest.raises(ValueError, match=error) as info:
        module._check_strategy()
    assert "AdapterModelParallelStrategy" in str(info.value) or "ModelParallelStrategy" in str(info.value)


def _fsdp1_units(model: torch.nn.Module, policy) -> dict[str, list[tuple[str, torch.nn.Parameter]]]:
    """What FSDP1 would flatten together: unit name -> the parameters it owns (not those of units inside it)."""
    wrapped = {n for n, m in model.named_modules() if n and policy(m, recurse=False, nonwrapped_numel=0)}
    units: dict[str, list[tuple[str, torch.nn.Parameter]]] = {n: [] for n in ["", *wrapped]}
    for name, p in model.named_parameters():
        owner = max((u for u in units if u == "" or name.startswith(u + ".")), key=len)
        units[owner].append((name, p))
    return units


def test_fsdp1_gets_a_wrap_policy_with_one_dtype_per_unit_and_adapters_apart():
    """Without an auto_wrap_policy Lightning would make the whole model one FSDP1 unit, which cannot even be
    flattened with a bf16 base and fp32 adapters. fsdp1_wrap_policy: every frozen leaf is a unit, then each
    decoder layer (left with its B only), then the root (the shared A): one dtype per unit, no frozen weight
    in an adapter unit."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    module = _module(dtype="bfloat16")
    module._trainer = SimpleNamespace(strategy=FSDPStrategy())
    module.configure_model()
    units = _fsdp1_units(module.model, module._trainer.strategy.kwargs["auto_wrap_policy"])
    layers = {f"model.layers.{i}" for i in range(module.model.config.num_hidden_layers)}
    assert layers <= set(units)
    for name, params in units.items():
        assert len({p.dtype for _, p in params}) <= 1, (name, {n: p.dtype for n, p in params})
        adapter = [is_adapter_param(n) for n, _ in params]
        assert all(adapter) or not any(adapter), name  # adapters never share a unit with frozen weights
    assert {n for n, _ in units[""]} == {n for n, _ in module.model.named_parameters() if "effilora_shared_a" in n}
    assert all(all(is_adapter_param(n) for n, _ in units[layer]) and units[layer] for layer in layers)

    user_policy = object()  # a policy the user chose is theirs
    module = _module()
    module._trainer = SimpleNamespace(strategy=FSDPStrategy(auto_wrap_policy=user_policy))
    module.configure_model()
    assert module._trainer.strategy.kwargs["auto_wrap_policy"] is user_policy


def test_fsdp1_policy_leaves_tied_embeddings_with_the_root():
    """A weight held by two modules (tied input and output embeddings) must sit in one unit: the root's."""
    from helpers import tiny_llama_config
    from transformers import LlamaForCausalLM

    from effilora_lightning.models.sharding import fsdp1_wrap_policy

    config = tiny_llama_config()
    config.tie_word_embeddings = True
    model = LlamaForCausalLM(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    apply_adapter(model, EffiLoRAConfig(rank=4))
    units = _fsdp1_units(model, fsdp1_wrap_policy(model))
    assert "model.embed_tokens" not in units and "lm_head" not in units
    assert "model.embed_tokens.weight" in {n for n, _ in units[""]}
    assert "model.norm" in units  # untied frozen leaves still get their own unit


def test_end_of_run_files_ask_every_rank_for_the_log_dir(tmp_path, monkeypatch):
    """Trainer.log_dir is a broadcast under distributed strategies: asked on rank 0 alone it hangs the run at
    its very end. The test report and the selection heatmap ask on every rank and write on rank 0 only."""
    from types import SimpleNamespace

    from effilora_lightning import EffiLoRACallback

    asked: list[int] = []

    class Rank1:
        is_global_zero = False
        default_root_dir = str(tmp_path)

        @property
        def log_dir(self) -> str:
            asked.append(1)
            return str(tmp_path)

    module = _module()
    module._trainer = Rank1()
    module._report_test({"average": 0.5}, {"average": 2})
    assert asked == [1] and module.test_results == {"average": 0.5}

    from lightning.pytorch.utilities import rank_zero_only

    monkeypatch.setattr(rank_zero_only, "rank", 1)
    callback = EffiLoRACallback()
    callback.reducer = SimpleNamespace(history=[torch.ones(2, dtype=torch.bool)])
    callback.on_fit_end(Rank1(), module)
    assert asked == [1, 1] and list(tmp_path.iterdir()) == []  # rank 1 writes nothing


def test_answers_are_read_after_the_prompts_marker_from_prompt_plus_generation():
    """The model writes "### Response:" again: the answer is the one before it (commonsense_evaluate.py)."""
    dm = _datamodule(eval_tasks=["ARC-Easy"], max_test_samples_per_task=2, eval_batch_size=2)
    dm.setup("test")
    module = _module()
    module.configure_model()
    module.tokenizer = dm.tokenizer
    batch = next(iter(dm.test_dataloader()))
    ramble = dm.tokenizer("the correct answer is answer2\n\n### Response:\nthe correct answer is answer3",
                          add_special_tokens=False, return_tensors="pt").input_ids
    module.model.generate = lambda input_ids, **kw: torch.cat([input_ids, ramble.expand(len(input_ids), -1)], dim=1)
    texts = module.generate_answers(batch)
    prompts = [dm.tokenizer.decode(row[mask.bool()], skip_special_tokens=True)
               for row, mask in zip(batch["input_ids"], batch["attention_mask"])]
    assert texts == [p + "the correct answer is answer2\n\n### Response:\nthe correct answer is answer3" for p in prompts]
    from effilora_lightning.data.commonsense_prompts import extract_answer

    assert [extract_answer("ARC-Easy", t) for t in texts] == ["answer2", "answer2"]


def test_an_eval_prompt_longer_than_the_models_context_fails_before_any_step(tmp_path):
    dm = _datamodule(eval_tasks=["piqa"], max_test_samples_per_task=3)
    module = _module(max_new_tokens=32)
    module.configure_model()
    dm.setup("test")
    length, task, index = dm.longest_eval_prompt
    module.model.config.max_position_embeddings = length + 31  # one position short
    with pytest.raises(ValueError, match=rf"eval task piqa: record {index} is a {length}-token prompt; .* more than "
                                         rf"the model's context \(max_position_embeddings={length + 31}\)"):
        _trainer(tmp_path).test(module, datamodule=dm)
    module.model.config.max_position_embeddings = length + 32
    _trainer(tmp_path).test(module, datamodule=dm)


def test_padding_fraction_is_logged_from_each_training_batch(tmp_path):
    """perf/padding_fraction = padding positions / all positions of the step's batch."""
    dm = _datamodule(batch_size=4, val_set_size=0, val_generation_samples_per_task=0)
    module = _module()
    seen = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            mask = batch["attention_mask"]
            seen.append((float(trainer.callback_metrics["perf/padding_fraction"]),
                         float((mask == 0).sum()) / mask.numel()))

    _trainer(tmp_path, max_steps=3, callbacks=[Record()], limit_val_batches=0).fit(module, datamodule=dm)
    assert len(seen) == 3 and all(logged == pytest.approx(expected, abs=1e-7) for logged, expected in seen)
    assert any(expected > 0 for _, expected in seen)


def test_the_typed_selection_config_reaches_the_callback_and_round_trips_through_hparams():
    from effilora_lightning.callbacks import EfficiencyMonitor, EffiLoRACallback
    from effilora_lightning.selection import SelectionConfig

    config = SelectionConfig(keep_ratio=0.25, selection="topk", warmup_steps=3)
    module = _module(adapter=EffiLoRAConfig(rank=4), selection=config, log_every_n_steps=7, peak_flops=1e12)
    effilora, monitor = module.configure_callbacks()
    assert isinstance(effilora, EffiLoRACallback) and isinstance(monitor, EfficiencyMonitor)
    assert effilora.config == config and module.reducer is effilora and module.selection == config
    assert effilora.log_every_n_steps == 7 and monitor.peak_flops == 1e12
    again = CausalLMModule(adapter=EffiLoRAConfig(rank=4), model_path=str(TINY), **{
        k: v for k, v in module.hparams.items() if k in ("selection", "log_every_n_steps")})  # as from a checkpoint
    assert again.reducer.config == config
    lora = _module(adapter=LoRAConfig(rank=4), selection=config)  # other methods: the monitor only
    assert [type(c).__name__ for c in lora.configure_callbacks()] == ["EfficiencyMonitor"] and lora.reducer is None


def test_selection_and_the_older_reducer_block_are_one_setting():
    from effilora_lightning.selection import SelectionConfig

    old = _module(adapter=EffiLoRAConfig(rank=4), reducer={"keep_ratio": 0.25, "log_every_n_steps": 7})
    assert old.reducer.config == SelectionConfig(keep_ratio=0.25) and old.reducer.log_every_n_steps == 7
    with pytest.raises(ValueError, match="`selection` \\(typed\\) or `reducer`"):
        _module(adapter=EffiLoRAConfig(rank=4), selection=SelectionConfig(), reducer={"keep_ratio": 0.5})
    with pytest.raises(ValueError, match="selection.keep_ration is not a setting of SelectionConfig"):
        _module(adapter=EffiLoRAConfig(rank=4), selection={"keep_ration": 0.5})
