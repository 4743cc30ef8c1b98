"""Bad settings fail before training, naming the key or token: numeric ranges, the reducer block, image size,
pad tokens the model has no embedding for. Most need no training step at all."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lightning.pytorch as pl
import pytest

from effilora_lightning import (
    CausalLMModule,
    CommonsenseDataModule,
    EffiLoRAConfig,
    LoRAConfig,
    VisionLanguageModule,
    VisualInstructionDataModule,
)
from effilora_lightning.cli import run

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "data" / "checkpoints" / "tiny-llama"
DATA = ROOT / "data" / "datasets" / "commonsense"
DEMO = ROOT / "configs" / "demo" / "commonsense_effilora.yaml"
TOWER = dict(vision_tower="effilora-tiny-vit", vision_pretrained=str(ROOT / "data/checkpoints/tiny-clip/open_clip_model.safetensors"))


def _module(**kw) -> CausalLMModule:
    kw.setdefault("adapter", EffiLoRAConfig(rank=4, target_modules=["q_proj", "v_proj"]))
    return CausalLMModule(model_path=str(TINY), **kw)


def _trainer(tmp_path, **kw) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, default_root_dir=tmp_path, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      limit_val_batches=0, max_steps=1, **kw)


def _commonsense(**kw) -> CommonsenseDataModule:
    args = dict(data_path=str(DATA / "commonsense_170k.json"), dataset_dir=str(DATA / "dataset"),
                tokenizer_path=str(TINY), cutoff_len=96, batch_size=4, eval_batch_size=8, val_set_size=0,
                max_test_samples_per_task=1)
    args.update(kw)
    return CommonsenseDataModule(**args)


class _NoStep(pl.Callback):
    """Fails the test if a training batch ever starts: the error must come before training."""

    def on_train_batch_start(self, *args) -> None:
        raise AssertionError("a training step started")


# ---------------------------------------------------------------------------------------------- numeric ranges
@pytest.mark.parametrize(("key", "value"), [
    ("learning_rate", -1e-3),
    ("learning_rate", "fast"),
    ("lr_shared_a", -1.0),
    ("lr_b", -0.5),
    ("lr_router", float("nan")),
    ("weight_decay", -0.1),
    ("warmup_steps", -10),
    ("warmup_steps", 1.5),  # a float is a share of all steps: must be < 1
    ("warmup_steps", True),
    ("min_lr_ratio", 1.5),
    ("min_lr_ratio", -0.1),
    ("max_new_tokens", 0),
    ("num_beams", 0),
    ("num_beams", 2.0),
    ("init_seed", 0.5),
])
def test_numeric_setting_out_of_range_names_the_key(key, value):
    with pytest.raises(ValueError, match=rf"^CausalLMModule: {key} must be .*got {value!r}"):
        _module(**{key: value})


@pytest.mark.parametrize(("key", "value"), [("lr_projector", -2e-5), ("select_layer", 1.5), ("warmup_steps", -1)])
def test_vision_language_setting_out_of_range_names_the_key(key, value):
    with pytest.raises(ValueError, match=rf"^VisionLanguageModule: {key} must be "):
        VisionLanguageModule(adapter=None, model_path=str(TINY), **TOWER, **{key: value})


def test_settings_in_range_are_accepted_as_given():
    module = _module(learning_rate=0.0, weight_decay=0.0, warmup_steps=0.5, min_lr_ratio=1.0, max_new_tokens=1)
    assert module.hparams.warmup_steps == 0.5 and module.hparams.min_lr_ratio == 1.0


def test_lr_b_zero_freezes_b_instead_of_falling_back_to_learning_rate():
    module = _module(learning_rate=1e-2, lr_b=0.0, lr_shared_a=None)
    module.configure_model()
    groups = {g["name"]: g["lr"] for g in module.param_groups()}
    assert groups == {"shared_a": 1e-2, "b": 0.0}


# ---------------------------------------------------------------------------------------------- reducer block
def test_reducer_keep_ratio_of_the_wrong_type_says_what_it_must_be():
    with pytest.raises(ValueError, match=r"^reducer\.keep_ratio must be a float \(.*in \(0, 1\].*got 'half'"):
        _module(reducer={"keep_ratio": "half"})


def test_reducer_unknown_key_is_refused_with_close_matches():
    with pytest.raises(ValueError, match=r"^reducer\.keep_ration is not an argument of EffiLoRACallback\. "
                                         r"Did you mean 'keep_ratio'"):
        _module(reducer={"keep_ration": 0.5})


def test_reducer_choice_outside_its_literal_lists_the_choices():
    with pytest.raises(ValueError, match=r"reducer\.importance must be one of 'taylor', 'grad_norm'.*got 'taylr'"):
        _module(reducer={"importance": "taylr"})


def test_reducer_value_out_of_range_is_the_callbacks_message_prefixed_by_the_block():
    with pytest.raises(ValueError, match=r"^reducer: EffiLoRACallback\(keep_ratio=1\.5\): must be in \(0, 1\]"):
        _module(reducer={"keep_ratio": 1.5})


def test_reducer_that_is_not_a_mapping_is_a_type_error():
    with pytest.raises(TypeError, match="reducer must be a mapping"):
        _module(reducer=["keep_ratio", 0.5])


def test_reducer_block_is_checked_even_when_the_method_ignores_it():
    with pytest.raises(ValueError, match="reducer.every_n_steps must be an int"):
        _module(adapter=LoRAConfig(rank=4), reducer={"every_n_steps": True})


def test_reducer_check_follows_the_callback_signature():
    """Built from inspect.signature: every argument EffiLoRACallback takes is accepted with a valid value."""
    import inspect

    from effilora_lightning import EffiLoRACallback
    from effilora_lightning.models.settings import check_reducer

    defaults = {n: p.default for n, p in inspect.signature(EffiLoRACallback).parameters.items()}
    assert check_reducer(defaults) == defaults


def test_reducer_errors_reach_the_command_line(monkeypatch):
    monkeypatch.chdir(ROOT)
    for arg, expected in ((["--model.init_args.reducer.keep_ratio", "half"], "reducer.keep_ratio must be a float"),
                          (["--model.init_args.reducer.keep_ration", "0.5"], "Did you mean 'keep_ratio'")):
        with pytest.raises(ValueError) as error:  # the module's own message, not jsonargparse's Union error
            run(["fit", "--config", str(DEMO), "--trainer.logger", "false", *arg])
        assert str(error.value).startswith(expected) or expected in str(error.value).splitlines()[0]


def test_selection_errors_reach_the_command_line_as_the_configs_own(monkeypatch):
    monkeypatch.chdir(ROOT)
    for arg, expected in ((["--model.init_args.selection.keep_ratio", "2"], "SelectionConfig(keep_ratio=2.0): must be in (0, 1]."),
                          (["--model.init_args.adapter.init_args.rank", "-1"], "EffiLoRAConfig.rank must be a positive integer")):
        with pytest.raises(ValueError) as error:  # not jsonargparse's "Does not validate against any of the Union subtypes"
            run(["fit", "--config", str(DEMO), "--trainer.logger", "false", *arg])
        assert str(error.value).startswith(expected)


# ---------------------------------------------------------------------------------------------- model vs data
def test_image_size_other_than_the_towers_fails_before_step_one(tmp_path):
    module = VisionLanguageModule(adapter=None, model_path=str(TINY), **TOWER)
    data = VisualInstructionDataModule(
        data_path=str(ROOT / "data/datasets/llava/llava_train.json"), image_folder=str(ROOT / "data/datasets/llava"),
        tokenizer_path=str(TINY), image_size=32, max_length=256, val_set_size=0, batch_size=4, system_prompt="")
    trainer = _trainer(tmp_path, callbacks=[_NoStep()])
    with pytest.raises(ValueError, match=r"data.image_size=32 but the vision tower effilora-tiny-vit expects 64"):
        trainer.fit(module, datamodule=data)
    assert module.model is not None and trainer.global_step == 0


def _tokenizer_with_pad(tmp_path: Path, pad: str) -> Path:
    """The tiny LLaMA's tokenizer whose config names a pad token its vocabulary lacks (HF appends it)."""
    out = tmp_path / "tokenizer"
    out.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TINY / name, out / name)
    config = json.loads((out / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps({**config, "pad_token": pad}))
    return out


def test_pad_token_beyond_the_models_embeddings_fails_before_step_one_naming_it(tmp_path):
    data = _commonsense(tokenizer_path=str(_tokenizer_with_pad(tmp_path, "<pad>")))
    trainer = _trainer(tmp_path, callbacks=[_NoStep()])
    with pytest.raises(ValueError, match=r"pad token '<pad>' has id 1024, but the model \(.*tiny-llama\) has 1024 "
                                         r"input embeddings"):
        trainer.fit(_module(), datamodule=data)
    assert trainer.global_step == 0


def test_pad_token_check_also_runs_for_a_model_configured_before_the_trainer(tmp_path):
    module = _module()
    module.configure_model()  # setup() then finds the model already there and checks it
    with pytest.raises(ValueError, match="pad token '<pad>'"):
        _trainer(tmp_path, callbacks=[_NoStep()]).test(
            module, datamodule=_commonsense(tokenizer_path=str(_tokenizer_with_pad(tmp_path, "<pad>"))))


def test_token_ids_check_names_template_tokens_and_passes_the_bundled_tokenizer():
    from effilora_lightning.data.tokenizer import load_tokenizer
    from effilora_lightning.models.settings import check_token_ids

    tokenizer = load_tokenizer(TINY)  # bos 920, eos 921, pad 922, <|eot_id|> 929
    check_token_ids(tokenizer, 1024, ("<|eot_id|>",))
    with pytest.raises(ValueError, match=r"template token '<\|eot_id\|>' has id 929, but the model has 929 input"):
        check_token_ids(tokenizer, 929, ("<|start_header_id|>", "<|eot_id|>"))
