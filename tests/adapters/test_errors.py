"""Bad input fails before any training, with a message that says what, where and what to do."""

from __future__ import annotations

import pytest
from helpers import tiny_llama

from effilora_lightning.adapters import EffiLoRAConfig, HydraLoRAConfig, LilyConfig, LoRAConfig, apply_adapter


def test_no_match_lists_close_names():
    with pytest.raises(ValueError, match=r"matched no nn.Linear.*Close names: \['q_proj', "):
        apply_adapter(tiny_llama(), LoRAConfig(target_modules=["q_prj"]))


def test_regex_string_is_a_full_match():
    report = apply_adapter(tiny_llama(), LoRAConfig(rank=2, target_modules=r".*layers\.1\.self_attn\.(q|v)_proj"))
    assert report.wrapped == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]


def test_exclude_modules_and_layers_to_transform():
    report = apply_adapter(
        tiny_llama(layers=3),
        LoRAConfig(rank=2, target_modules=["q_proj", "v_proj"], exclude_modules=["v_proj"], layers_to_transform=[0, 2]),
    )
    assert report.wrapped == ["model.layers.0.self_attn.q_proj", "model.layers.2.self_attn.q_proj"]


def test_all_linear_skips_lm_head():
    report = apply_adapter(tiny_llama(), LoRAConfig(rank=2, target_modules="all-linear"))
    assert len(report.wrapped) == 2 * 7 and not any("lm_head" in n for n in report.wrapped)


@pytest.mark.parametrize("rank", [0, -3])
def test_rank_must_be_positive(rank):
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        EffiLoRAConfig(rank=rank)


def test_rank_larger_than_a_layer_allows_names_the_module():
    with pytest.raises(ValueError, match=r"rank=40 is larger than 'model.layers.0.self_attn.q_proj' allows"):
        apply_adapter(tiny_llama(), EffiLoRAConfig(rank=40, target_modules=["q_proj"]))


@pytest.mark.parametrize("cls", [EffiLoRAConfig, HydraLoRAConfig])
def test_num_heads_below_one(cls):
    with pytest.raises(ValueError, match="num_heads must be >= 1"):
        cls(num_heads=0)


def test_unknown_share_a_by_and_wrong_types_name_the_field():
    with pytest.raises(TypeError, match=r"EffiLoRAConfig.share_a_by must be"):
        EffiLoRAConfig(share_a_by="layer")
    with pytest.raises(TypeError, match=r"LoRAConfig.rank must be int"):
        LoRAConfig(rank="8")
    with pytest.raises(TypeError, match=r"LilyConfig.masked_routing must be bool"):
        LilyConfig(masked_routing="yes")
    with pytest.raises(TypeError, match=r"LoRAConfig.alpha must be float"):
        LoRAConfig(alpha=True)


def test_applying_twice_is_refused():
    model = tiny_llama()
    apply_adapter(model, LoRAConfig(rank=2))
    with pytest.raises(RuntimeError, match="apply_adapter was called twice"):
        apply_adapter(model, EffiLoRAConfig(rank=2))


def test_non_linear_target_is_refused():
    with pytest.raises(TypeError, match=r"matched 'model.embed_tokens', a Embedding"):
        apply_adapter(tiny_llama(), LoRAConfig(rank=2, target_modules=["embed_tokens"]))


def test_wrong_config_type():
    with pytest.raises(TypeError, match="needs a LoRAConfig, EffiLoRAConfig"):
        apply_adapter(tiny_llama(), object())
