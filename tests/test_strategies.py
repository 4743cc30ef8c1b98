"""AdapterModelParallelStrategy's checkpoint checks on real DCP directories written in one process.

The strategy's load path itself runs on 2 ranks in tests/distributed (resume, and a mismatched adapter).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from effilora_lightning import EffiLoRAConfig, apply_adapter
from effilora_lightning.adapters import is_adapter_param
from effilora_lightning.strategies import check_checkpoint_keys, saved_model_shapes


def _module_state(adapter: EffiLoRAConfig) -> dict[str, torch.Tensor]:
    """The state dict a LightningModule holding the adapted tiny LLaMA as ``self.model`` would have."""
    from helpers import tiny_llama

    model = tiny_llama(layers=2)
    apply_adapter(model, adapter)
    return {f"model.{k}": v for k, v in model.state_dict().items()}


def _shapes(state: dict[str, torch.Tensor]) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in state.items()}


def _adapter_only(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if is_adapter_param(k)}


@pytest.fixture
def saved(tmp_path) -> dict[str, torch.Size | None]:
    """An adapter-only DCP checkpoint laid out as Lightning writes it (state_dict, optimizer_0), rank 4 on q/v."""
    from torch.distributed.checkpoint import save

    adapter = _adapter_only(_module_state(EffiLoRAConfig(rank=4, target_modules=["q_proj", "v_proj"])))
    name = next(iter(adapter))
    optimizer = {"state": {name: {"exp_avg": torch.zeros(adapter[name].shape)}}, "param_groups": [{"lr": 0.1}]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is ... uninitialized, assuming ... a single process"
        save({"state_dict": adapter, "optimizer_0": optimizer}, checkpoint_id=tmp_path)
    return saved_model_shapes(tmp_path)


def test_saved_model_shapes_lists_the_model_entries_only_with_global_shapes(saved):
    expected = _shapes(_adapter_only(_module_state(EffiLoRAConfig(rank=4, target_modules=["q_proj", "v_proj"]))))
    assert saved == expected
    assert len(saved) == 2 * 2 + 2  # one B per target per layer, one shared A per target


def test_the_adapter_it_was_written_for_passes(saved):
    model = _shapes(_module_state(EffiLoRAConfig(rank=4, target_modules=["q_proj", "v_proj"])))
    check_checkpoint_keys(saved, model, [k for k in model if is_adapter_param(k)], "ckpt")


def test_another_rank_is_refused_naming_shapes_and_what_to_do(saved):
    model = _shapes(_module_state(EffiLoRAConfig(rank=8, target_modules=["q_proj", "v_proj"])))
    with pytest.raises(ValueError) as error:
        check_checkpoint_keys(saved, model, [k for k in model if is_adapter_param(k)], "ckpt")
    message = str(error.value)
    assert message.startswith("The checkpoint ckpt does not fit this model's adapter:\n")
    assert "  6 keys of another shape (checkpoint vs model): model.effilora_shared_a.q_proj (4, 32) vs (8, 32)," in message
    assert "missing" not in message and "not in the model" not in message
    assert message.endswith("Resume with the adapter configuration the checkpoint was trained with (method, rank, "
                            "target_modules, num_heads), or drop ckpt_path to start a new run.")


def test_other_target_modules_are_refused_naming_missing_and_unknown_keys(saved):
    model = _shapes(_module_state(EffiLoRAConfig(rank=4, target_modules=["q_proj", "k_proj"])))
    with pytest.raises(ValueError) as error:
        check_checkpoint_keys(saved, model, [k for k in model if is_adapter_param(k)], "ckpt")
    lines = str(error.value).splitlines()
    assert lines[1] == ("  3 keys missing from the checkpoint: model.effilora_shared_a.k_proj, "
                        "model.model.layers.0.self_attn.k_proj.effilora_B.0, "
                        "model.model.layers.1.self_attn.k_proj.effilora_B.0")
    assert lines[2] == ("  3 keys in the checkpoint but not in the model: model.effilora_shared_a.v_proj, "
                        "model.model.layers.0.self_attn.v_proj.effilora_B.0, "
                        "model.model.layers.1.self_attn.v_proj.effilora_B.0")
    assert lines[3] == "It holds effilora adapter weights."  # read from the keys when no config is given
    assert len(lines) == 5


def test_a_full_checkpoint_passes_and_nothing_is_required_beyond_what_the_caller_names(saved):
    model = _shapes(_module_state(EffiLoRAConfig(rank=4, target_modules=["q_proj", "v_proj"])))
    check_checkpoint_keys(model, model, list(model), "ckpt")  # an older checkpoint holding the base too
    check_checkpoint_keys(saved, model, [], "ckpt")
    only_head = "^The checkpoint ckpt does not fit this model's adapter:\n  1 key missing from the checkpoint: model.lm_head.weight\n"
    with pytest.raises(ValueError, match=only_head):
        check_checkpoint_keys(saved, model, ["model.lm_head.weight"], "ckpt")


def test_file_names_match_what_lightning_and_dcp_write(tmp_path):
    """The strategy names two files instead of importing Lightning's private constants; an upgrade that renames
    either fails here, not in a user's resume."""
    from lightning.fabric.utilities.load import _METADATA_FILENAME
    from torch.distributed.checkpoint import FileSystemWriter, save

    from effilora_lightning.strategies import DCP_METADATA_FILE, LIGHTNING_META_FILE

    assert LIGHTNING_META_FILE == _METADATA_FILENAME
    save({"x": torch.zeros(2)}, storage_writer=FileSystemWriter(str(tmp_path)))
    assert (tmp_path / DCP_METADATA_FILE).is_file()
