"""save/load round trip, merge/unmerge, and PEFT LoRA export parity."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_llama
from test_adapters import _randomise_adapters

from effilora_lightning.adapters import (
    EffiLoRAConfig,
    HydraLoRAConfig,
    LilyConfig,
    LoRAConfig,
    apply_adapter,
    export_peft_lora,
    load_adapter,
    merge_adapter,
    save_adapter,
    unmerge_adapter,
)

ALL = [LoRAConfig(rank=4), EffiLoRAConfig(rank=4), EffiLoRAConfig(rank=4, num_heads=2),
       HydraLoRAConfig(rank=4), LilyConfig(rank=4, num_a=2)]


@pytest.mark.parametrize("cfg", ALL, ids=lambda c: f"{c.method}{getattr(c, 'num_heads', '')}")
def test_save_then_load_onto_a_fresh_model_reproduces_outputs(cfg, tmp_path):
    model = tiny_llama()
    apply_adapter(model, cfg)
    _randomise_adapters(model)
    x = torch.randint(0, 128, (2, 9))
    expected = model(x).logits
    save_adapter(model, tmp_path / "adapter")
    meta = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert meta["method"] == cfg.method and "torch" in meta["versions"]
    down = model.model.layers[0].mlp.down_proj
    entry = meta["target_map"].get("model.layers.0.mlp.down_proj") or meta["target_map"]["model.layers.0.self_attn.q_proj"]
    assert entry["class"].endswith("Linear") and entry["class"] != "Linear"
    if cfg.method in ("effilora", "hydralora"):
        assert entry == {"in_features": 64, "out_features": 32, "class": type(down).__name__}
    fresh = tiny_llama()
    report = load_adapter(fresh, tmp_path / "adapter")  # applies the saved config, then loads
    assert report is not None and report.method == cfg.method
    torch.testing.assert_close(fresh(x).logits, expected, rtol=0, atol=0)


def test_save_keeps_frozen_b_and_is_relative_to_the_adapted_module(tmp_path):
    outer = torch.nn.Module()
    outer.model = tiny_llama()
    apply_adapter(outer.model, EffiLoRAConfig(rank=4))
    for n, p in outer.named_parameters():
        if "layers.1." in n and "effilora_B" in n:
            p.requires_grad_(False)
    save_adapter(outer, tmp_path / "a")
    from safetensors.torch import load_file

    keys = set(load_file(str(tmp_path / "a" / "adapter_model.safetensors")))
    assert "model.layers.1.self_attn.q_proj.effilora_B.0" in keys  # frozen, still saved
    assert "effilora_shared_a.q_proj" in keys and not any(k.startswith("model.model.") for k in keys)


def test_load_with_a_different_shape_names_module_and_both_shapes(tmp_path):
    model = tiny_llama()
    apply_adapter(model, LoRAConfig(rank=4))
    save_adapter(model, tmp_path / "a")
    other = tiny_llama(hidden=64)
    with pytest.raises(ValueError, match=r"shape mismatch at 'model.layers.0.self_attn.q_proj.lora_A': file has \(4, 32\), model has \(4, 64\)"):
        load_adapter(other, tmp_path / "a")


def test_load_missing_module_is_named(tmp_path):
    model = tiny_llama(layers=3)
    apply_adapter(model, LoRAConfig(rank=4))
    save_adapter(model, tmp_path / "a")
    with pytest.raises(ValueError, match=r"'model.layers.2.self_attn.q_proj.lora_A' has no matching adapter parameter"):
        load_adapter(tiny_llama(layers=2), tmp_path / "a")


def test_save_overwrites_atomically(tmp_path):
    model = tiny_llama()
    apply_adapter(model, LoRAConfig(rank=4))
    save_adapter(model, tmp_path / "a")
    _randomise_adapters(model)
    save_adapter(model, tmp_path / "a")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temp or old directories left
    fresh = tiny_llama()
    load_adapter(fresh, tmp_path / "a")
    torch.testing.assert_close(fresh.model.layers[0].self_attn.q_proj.lora_B, model.model.layers[0].self_attn.q_proj.lora_B)


@pytest.mark.parametrize("cfg", [LoRAConfig(rank=4), EffiLoRAConfig(rank=4)], ids=["lora", "effilora"])
def test_merge_then_unmerge_round_trip(cfg):
    model = tiny_llama()
    base_w = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    apply_adapter(model, cfg)
    _randomise_adapters(model)
    x = torch.randint(0, 128, (2, 9))
    expected = model(x).logits
    merge_adapter(model)
    merge_adapter(model)  # idempotent
    q = model.model.layers[0].self_attn.q_proj
    assert q.merged and not torch.equal(q.base_layer.weight, base_w)
    torch.testing.assert_close(model(x).logits, expected, rtol=1e-5, atol=1e-5)
    unmerge_adapter(model)
    unmerge_adapter(model)
    torch.testing.assert_close(q.base_layer.weight, base_w, rtol=0, atol=1e-6)
    torch.testing.assert_close(model(x).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cfg", [EffiLoRAConfig(rank=4, num_heads=2), HydraLoRAConfig(rank=4), LilyConfig(rank=4)])
def test_router_methods_refuse_to_merge_and_touch_nothing(cfg):
    model = tiny_llama()
    apply_adapter(model, cfg)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(ValueError, match="cannot be merged: its update depends on the input"):
        merge_adapter(model)
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())


@pytest.mark.parametrize("cfg", [LoRAConfig(rank=4, target_modules=["q_proj", "v_proj"], layers_to_transform=[1]),
                                 EffiLoRAConfig(rank=4), EffiLoRAConfig(rank=4, share_a_by="in_features")],
                         ids=["lora", "effilora", "effilora_in_features"])
def test_peft_export_gives_the_same_logits(cfg, tmp_path):
    peft = pytest.importorskip("peft")
    model = tiny_llama()
    apply_adapter(model, cfg)
    _randomise_adapters(model)
    x = torch.randint(0, 128, (2, 9))
    expected = model(x).logits
    export_peft_lora(model, tmp_path / "peft")
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "peft")).eval()
    torch.testing.assert_close(loaded(x).logits, expected, rtol=0, atol=1e-5)
    # and PEFT wrapped exactly the modules we did
    wrapped = sorted(n for n, m in loaded.named_modules() if hasattr(m, "lora_A") and n.endswith("proj"))
    ours = sorted(n for n, m in model.named_modules() if hasattr(m, "base_layer"))
    assert [w.removeprefix("base_model.model.") for w in wrapped] == ours


def test_peft_export_refuses_router_methods(tmp_path):
    model = tiny_llama()
    apply_adapter(model, HydraLoRAConfig(rank=4))
    with pytest.raises(ValueError, match="Only LoRA and single-head EffiLoRA"):
        export_peft_lora(model, tmp_path / "x")
