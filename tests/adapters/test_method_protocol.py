"""The method protocol: a fifth adapter method is one file (here: a toy VeRA defined in this test) and every part
of the package takes it without a change: injection, the report and optimizer groups, save/load, merge, the
PEFT LoRA export, and a Lightning fit whose checkpoint holds its weights only.

Toy VeRA (Kopiczko et al., 2024), simplified: per input width one frozen random A (r x d_in) and per output
width one frozen random B (d_out x r) at the model root; per wrapped Linear two trainable vectors d (r) and
b (d_out, zeros). delta W = (alpha / r) diag(b) B diag(d) A: a static update (it merges) and exactly a LoRA's,
with A' = diag(d) A and B' = diag(b) B (so it exports as PEFT LoRA).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_llama
from torch import nn

from effilora_lightning.adapters import (
    AdapterConfig,
    AdapterLinear,
    AdapterMethod,
    LoRAConfig,
    apply_adapter,
    export_peft_lora,
    is_adapter_param,
    load_adapter,
    merge_adapter,
    param_group,
    register_method,
    save_adapter,
    unmerge_adapter,
)
from effilora_lightning.adapters.base import new_param
from effilora_lightning.adapters.method import adapter_prefixes, method_of, temporarily_registered

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class ToyVeRAConfig(AdapterConfig):
    method: ClassVar[str] = "toyvera"

    alpha: float = 4.0
    dropout: float = 0.0
    d_init: float = 0.1


class ToyVeRAShared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.toyvera_basis = nn.ParameterDict()  # "a<d_in>" -> (r, d_in), "b<d_out>" -> (d_out, r); frozen


class ToyVeRALinear(AdapterLinear):
    method: ClassVar[str] = "toyvera"

    def __init__(self, base_layer: nn.Linear, cfg: ToyVeRAConfig, shared: ToyVeRAShared) -> None:
        super().__init__(base_layer, cfg.dropout)
        w = base_layer.weight
        object.__setattr__(self, "_shared", shared)
        self.scaling = cfg.alpha / cfg.rank
        self.toyvera_d = nn.Parameter(torch.full((cfg.rank,), cfg.d_init, dtype=torch.float32, device=w.device))
        self.toyvera_b = nn.Parameter(torch.zeros(self.out_features, dtype=torch.float32, device=w.device))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        basis = self._shared.toyvera_basis
        a, b = basis[f"a{self.in_features}"], basis[f"b{self.out_features}"]
        return self.toyvera_d[:, None] * a, self.toyvera_b[:, None] * b  # (r, d_in), (d_out, r)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.factors()
        return F.linear(F.linear(self.dropout(x).float(), a), b) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        a, b = self.factors()
        return (b @ a) * self.scaling


def build_toy(cfg: ToyVeRAConfig, model: nn.Module, layers: dict[str, nn.Linear], gen: torch.Generator):
    shared = ToyVeRAShared()
    for layer in layers.values():
        for key, shape in ((f"a{layer.in_features}", (cfg.rank, layer.in_features)),
                           (f"b{layer.out_features}", (layer.out_features, cfg.rank))):
            if key not in shared.toyvera_basis:
                p = new_param(shape, layer.weight, torch.float32)
                with torch.no_grad():
                    p.copy_(torch.randn(shape, generator=gen) / shape[1] ** 0.5)
                shared.toyvera_basis[key] = p.requires_grad_(False)
    wrapped = {name: ToyVeRALinear(layer, cfg, shared) for name, layer in layers.items()}
    return {"toyvera_shared": shared}, wrapped, {"toyvera_bases": len(shared.toyvera_basis)}


TOY = AdapterMethod(
    name="toyvera", config=ToyVeRAConfig, layer=ToyVeRALinear, build=build_toy,
    groups={"toyvera_basis": "basis", "toyvera_d": "a", "toyvera_b": "b"},
    merges=lambda cfg: True, is_lora=lambda cfg: True, lora_factors=lambda m: m.factors(),
)
TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(autouse=True)
def toy_method():
    with temporarily_registered(TOY) as method:
        yield method


def _adapted(seed: int = 0) -> nn.Module:
    model = tiny_llama()
    apply_adapter(model, ToyVeRAConfig(rank=4, target_modules=TARGETS, seed=seed))
    return model


def _randomise(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "toyvera_b" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_the_registry_knows_the_toy_method_only_while_registered():
    assert method_of(ToyVeRAConfig()) is TOY and "toyvera_" in adapter_prefixes()
    assert is_adapter_param("model.layers.0.self_attn.q_proj.toyvera_d")
    assert param_group("model.layers.0.mlp.down_proj.toyvera_b") == "b"
    assert param_group("toyvera_shared.toyvera_basis.a32") == "basis"


def test_injection_freezes_the_base_and_reports_the_new_groups():
    model = tiny_llama()
    report = apply_adapter(model, ToyVeRAConfig(rank=4, target_modules=TARGETS))
    assert len(report.wrapped) == 2 * 3 and report.base_trainable == 0
    # tiny LLaMA: q 32->32, v 32->16 (2 kv heads of 8), down 64->32; bases a32, a64 (4 x d_in), b32, b16 (d_out x 4)
    assert report.groups == {"basis": 4 * 32 + 4 * 64 + 32 * 4 + 16 * 4, "a": 6 * 4, "b": 2 * (32 + 16 + 32)}
    assert report.extras == {"toyvera_bases": len(model.toyvera_shared.toyvera_basis)}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("toyvera_d", "toyvera_b")) for n in trainable)


def test_zero_init_equals_the_base_and_only_adapter_weights_train():
    x = torch.randint(0, 128, (2, 9))
    base = tiny_llama()
    ref = base(x).logits
    model = _adapted()
    assert torch.equal(model(x).logits, ref)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(2):
        model.train()(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(is_adapter_param(n) for n in changed) and any("toyvera_b" in n for n in changed)


def test_save_load_merge_and_peft_export(tmp_path):
    x = torch.randint(0, 128, (2, 9))
    model = _adapted().eval()
    _randomise(model)
    expected = model(x).logits
    save_adapter(model, tmp_path / "adapter")
    fresh = tiny_llama().eval()
    load_adapter(fresh, tmp_path / "adapter")  # applies the saved toyvera config, then loads d, b and the bases
    torch.testing.assert_close(fresh(x).logits, expected, rtol=0, atol=0)
    merge_adapter(model)
    torch.testing.assert_close(model(x).logits, expected, rtol=0, atol=1e-5)
    unmerge_adapter(model)
    peft = pytest.importorskip("peft")
    export_peft_lora(model, tmp_path / "peft")
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "peft")).eval()
    torch.testing.assert_close(loaded(x).logits, expected, rtol=0, atol=1e-5)


def test_registering_a_clashing_or_inconsistent_method_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        register_method(AdapterMethod(name="toyvera", config=ToyVeRAConfig, layer=ToyVeRALinear, groups={}))
    with pytest.raises(ValueError, match="do not start with 'toyvera_'"):
        register_method(AdapterMethod(name="toyvera", config=ToyVeRAConfig, layer=ToyVeRALinear,
                                      groups={"vera_d": "a"}))
    with pytest.raises(ValueError, match="ToyVeRAConfig.method is 'toyvera'"):
        register_method(AdapterMethod(name="lora2", config=ToyVeRAConfig, layer=ToyVeRALinear, groups={}))
    assert method_of(LoRAConfig()).name == "lora"  # the built-in methods are untouched
