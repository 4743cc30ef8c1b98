"""Bad adapter directories (``save_adapter`` output): each error names the file and what is wrong with it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import tiny_llama

from effilora_lightning import CausalLMModule, EffiLoRAConfig, LoRAConfig, VisionLanguageModule, apply_adapter
from effilora_lightning.adapters import load_adapter, save_adapter
from effilora_lightning.adapters.export import CONFIG_NAME, WEIGHTS_NAME

ROOT = Path(__file__).resolve().parents[2]
TARGETS = ["q_proj", "v_proj"]


def _saved(tmp_path: Path, config=None, name: str = "adapter") -> Path:
    model = tiny_llama()
    apply_adapter(model, config or LoRAConfig(rank=4, target_modules=TARGETS))
    return save_adapter(model, tmp_path / name)


def _config(directory: Path) -> dict:
    return json.loads((directory / CONFIG_NAME).read_text())


def _rewrite_config(directory: Path, **changes) -> None:
    (directory / CONFIG_NAME).write_text(json.dumps({**_config(directory), **changes}))


def test_config_that_is_not_json_names_the_file_and_the_position(tmp_path):
    directory = _saved(tmp_path)
    (directory / CONFIG_NAME).write_text('{"format": "effilora_lightning.adapter/1",')
    with pytest.raises(ValueError, match=rf"{directory / CONFIG_NAME} is not valid JSON \(.*line 1 column"):
        load_adapter(tiny_llama(), directory)


def test_unknown_method_names_it_and_the_known_ones(tmp_path):
    directory = _saved(tmp_path)
    _rewrite_config(directory, config={**_config(directory)["config"], "method": "dora"})
    with pytest.raises(ValueError, match=rf"{directory / CONFIG_NAME} names the adapter method 'dora'; known methods: "
                                         "lora, effilora, hydralora, lily"):
        load_adapter(tiny_llama(), directory)


def test_misspelt_method_gets_a_close_match(tmp_path):
    directory = _saved(tmp_path)
    _rewrite_config(directory, config={**_config(directory)["config"], "method": "effilor"})
    with pytest.raises(ValueError, match=r"'effilor' \(did you mean effilora"):
        load_adapter(tiny_llama(), directory)


def test_config_field_the_method_does_not_take_is_named(tmp_path):
    directory = _saved(tmp_path)
    _rewrite_config(directory, config={**_config(directory)["config"], "use_dora": True})
    with pytest.raises(ValueError, match=rf"{directory / CONFIG_NAME}: its config does not fit LoRAConfig: .*use_dora"):
        load_adapter(tiny_llama(), directory)


def test_config_of_another_format_names_the_format(tmp_path):
    directory = _saved(tmp_path)
    (directory / CONFIG_NAME).write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    with pytest.raises(ValueError, match=r"is not an effilora_lightning adapter \(format=None"):
        load_adapter(tiny_llama(), directory)


def test_config_and_weights_of_different_methods_say_which_is_which(tmp_path):
    lora = _saved(tmp_path, name="lora")
    effilora = _saved(tmp_path, EffiLoRAConfig(rank=4, target_modules=TARGETS), name="effilora")
    (lora / WEIGHTS_NAME).write_bytes((effilora / WEIGHTS_NAME).read_bytes())
    with pytest.raises(ValueError, match=rf"{lora}: {CONFIG_NAME} says lora, but the weights in {WEIGHTS_NAME} are "
                                         "effilora: the two files come from different adapters"):
        load_adapter(tiny_llama(), lora)


def test_truncated_adapter_weights_name_the_file(tmp_path):
    directory = _saved(tmp_path)
    weights = directory / WEIGHTS_NAME
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"{weights} is truncated: {len(data) // 2} bytes, but its header places "
                                         rf"tensor data up to byte {len(data)}"):
        load_adapter(tiny_llama(), directory)


def test_empty_adapter_weights_name_the_file(tmp_path):
    directory = _saved(tmp_path)
    (directory / WEIGHTS_NAME).write_bytes(b"")
    with pytest.raises(ValueError, match=rf"{directory / WEIGHTS_NAME} \(0 bytes\) is not a complete safetensors file"):
        load_adapter(tiny_llama(), directory)


def test_missing_adapter_weights_name_the_path(tmp_path):
    directory = _saved(tmp_path)
    (directory / WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=rf"No adapter weights at {directory / WEIGHTS_NAME}"):
        load_adapter(tiny_llama(), directory)


def test_a_broken_adapter_fails_the_module_at_configure_model(tmp_path):
    directory = _saved(tmp_path)
    (directory / CONFIG_NAME).write_text("not json")
    module = CausalLMModule(adapter=LoRAConfig(rank=4, target_modules=TARGETS),
                            model_path=str(ROOT / "data/checkpoints/tiny-llama"), load_adapter_from=str(directory))
    with pytest.raises(ValueError, match=rf"{directory / CONFIG_NAME} is not valid JSON"):
        module.configure_model()


def test_truncated_stage1_projector_names_the_file(tmp_path):
    projector = tmp_path / "mm_projector.safetensors"
    projector.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    module = VisionLanguageModule(
        adapter=None, model_path=str(ROOT / "data/checkpoints/tiny-llama"), vision_tower="effilora-tiny-vit",
        vision_pretrained=str(ROOT / "data/checkpoints/tiny-clip/open_clip_model.safetensors"), projector_path=str(projector))
    with pytest.raises(ValueError, match=rf"{projector} \(\d+ bytes\) is not a complete safetensors file"):
        module.configure_model()


def test_a_sound_adapter_still_round_trips(tmp_path):
    directory = _saved(tmp_path)
    model = tiny_llama()
    report = load_adapter(model, directory)
    assert report is not None and report.method == "lora"
