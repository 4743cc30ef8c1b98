"""Exact facts about the four adapter methods on a tiny LLaMA (CPU, seconds)."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_llama, tiny_llama_config

from effilora_lightning.adapters import (
    AdapterLinear,
    EffiLoRAConfig,
    HydraLoRAConfig,
    LilyConfig,
    LoRAConfig,
    apply_adapter,
    is_adapter_param,
)

CONFIGS = {
    "lora": LoRAConfig(rank=4, target_modules=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]),
    "effilora": EffiLoRAConfig(rank=4),
    "effilora_heads_in_features": EffiLoRAConfig(rank=4, num_heads=3, share_a_by="in_features"),
    "hydralora": HydraLoRAConfig(rank=4, num_heads=3),
    "lily": LilyConfig(rank=4, num_a=2, num_b=3),
}
IDS = list(CONFIGS)


def _randomise_adapters(model: torch.nn.Module, seed: int = 1) -> None:
    """B starts at zero; give every adapter tensor values so that its path matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if is_adapter_param(n):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("name", IDS)
def test_zero_init_output_equals_base_exactly(name):
    model = tiny_llama()
    x = torch.randint(0, 128, (2, 9))
    ref = model(x).logits
    apply_adapter(model, CONFIGS[name])
    assert torch.equal(model(x).logits, ref)


@pytest.mark.parametrize("name", IDS)
def test_everything_but_the_adapter_is_frozen(name):
    model = tiny_llama()
    report = apply_adapter(model, CONFIGS[name])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(is_adapter_param(n) for n in trainable)
    assert report.base_trainable == 0
    assert report.trainable == sum(p.numel() for n, p in model.named_parameters() if is_adapter_param(n))


@pytest.mark.parametrize("name", IDS)
def test_only_adapter_parameters_change_after_steps(name):
    model = tiny_llama().train()
    apply_adapter(model, CONFIGS[name])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    x = torch.randint(0, 128, (2, 9))
    for _ in range(3):
        model(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(is_adapter_param(n) for n in changed)
    assert any(".effilora_B." in n or "lora_B" in n or "hydralora_B" in n or "lily_hp" in n for n in changed)


def test_effilora_has_one_shared_a_key_per_group():
    model = tiny_llama(layers=3)
    apply_adapter(model, EffiLoRAConfig(rank=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    keys = [k for k in model.state_dict() if "effilora_shared_a" in k]
    assert keys == ["effilora_shared_a.q_proj", "effilora_shared_a.v_proj", "effilora_shared_a.down_proj"]
    assert sum(".effilora_B." in k for k in model.state_dict()) == 3 * 3


def test_effilora_in_features_groups_by_width():
    model = tiny_llama()
    report = apply_adapter(model, EffiLoRAConfig(rank=4, share_a_by="in_features"))
    assert report.extras["shared_a_groups"] == ["in32", "in64"]  # hidden 32; down_proj reads 64


class _PerModuleA:
    """Stands in for the shared-A owner: each module reads its own leaf copy of A."""

    def __init__(self, a: torch.Tensor) -> None:
        self.a, self.copies = a, []

    def project(self, x, group, dropout):
        copy = self.a.detach().clone().requires_grad_(True)
        self.copies.append(copy)
        return torch.nn.functional.linear(x.to(copy.dtype), copy)


def test_shared_a_gradient_is_the_sum_of_per_layer_contributions():
    from effilora_lightning.adapters import EffiLoRALinear

    model = tiny_llama(layers=3)
    apply_adapter(model, EffiLoRAConfig(rank=4, target_modules=["q_proj"]))
    _randomise_adapters(model)
    x = torch.randint(0, 128, (2, 9))
    model(x, labels=x).loss.backward()
    shared_grad = model.effilora_shared_a["q_proj"].grad.clone()
    stand_in = _PerModuleA(model.effilora_shared_a["q_proj"])
    for m in model.modules():
        if isinstance(m, EffiLoRALinear):
            object.__setattr__(m, "_shared", stand_in)
    model(x, labels=x).loss.backward()
    assert len(stand_in.copies) == 3
    per_layer = torch.stack([c.grad for c in stand_in.copies])
    assert per_layer.abs().sum(dim=(1, 2)).min() > 0  # every layer contributes
    torch.testing.assert_close(per_layer.sum(0), shared_grad, rtol=1e-5, atol=1e-7)


def test_reused_projection_gives_identical_outputs_and_grads():
    outs, grads = [], []
    for reuse in (True, False):
        model = tiny_llama()
        apply_adapter(model, EffiLoRAConfig(rank=4, share_a_by="in_features", reuse_projection=reuse))
        _randomise_adapters(model)
        x = torch.randint(0, 128, (2, 9))
        out = model(x, labels=x)
        out.loss.backward()
        outs.append(out.logits)
        grads.append(model.effilora_shared_a["in32"].grad)
    assert model.effilora_shared_a.reuse_projection is False
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def _q_adapted(detach: bool, frozen: int = 0) -> torch.nn.Module:
    model = tiny_llama(layers=3)
    apply_adapter(model, EffiLoRAConfig(rank=4, target_modules=["q_proj"], detach_frozen=detach))
    _randomise_adapters(model)
    model.model.layers[frozen].self_attn.q_proj.effilora_B[0].requires_grad_(False)  # not selected this step
    return model


def test_detach_frozen_keeps_the_output_and_trains_a_from_the_selected_layers_only():
    from effilora_lightning.adapters import EffiLoRALinear

    x = torch.randint(0, 128, (2, 9))
    per_layer_model = _q_adapted(detach=False)
    stand_in = _PerModuleA(per_layer_model.effilora_shared_a["q_proj"])
    for m in per_layer_model.modules():
        if isinstance(m, EffiLoRALinear):
            object.__setattr__(m, "_shared", stand_in)
    ref = per_layer_model(x, labels=x)
    ref.loss.backward()
    model = _q_adapted(detach=True)
    out = model(x, labels=x)
    out.loss.backward()
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=0)
    per_layer = [c.grad for c in stand_in.copies]
    assert per_layer[0].abs().sum() > 0  # without detaching, layer 0 would have contributed
    torch.testing.assert_close(model.effilora_shared_a["q_proj"].grad, per_layer[1] + per_layer[2], rtol=1e-5, atol=1e-7)
    b = model.model.layers[1].self_attn.q_proj.effilora_B[0]
    torch.testing.assert_close(b.grad, per_layer_model.model.layers[1].self_attn.q_proj.effilora_B[0].grad)


def test_detach_frozen_saves_the_frozen_layers_adapter_backward_flops():
    """The top layer's q_proj frozen (d_in = d_out = 32, r = 4, N = 18 tokens): the backward no longer computes
    dh = dy B (2 N r d_out), dx += dh A (2 N r d_in) and dA += dh^T x (2 N r d_in). (Frozen layers BELOW every
    selected one save more: with nothing to train there, autograd stops above them.)"""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randint(0, 128, (2, 9))
    flops = []
    for detach in (False, True):
        model = _q_adapted(detach, frozen=2)
        with FlopCounterMode(display=False) as counter:
            model(x, labels=x).loss.backward()
        flops.append(counter.get_total_flops())
    assert flops[0] - flops[1] == 2 * 18 * 4 * (32 + 2 * 32)


def test_detach_frozen_never_hands_a_detached_projection_to_a_training_sibling():
    """module granularity: q frozen (detached) and k selected read the same A x cache; k must still train A."""
    grads = []
    for reuse in (True, False):
        model = tiny_llama()
        apply_adapter(model, EffiLoRAConfig(rank=4, target_modules=["q_proj", "k_proj"], share_a_by="in_features",
                                            reuse_projection=reuse, detach_frozen=True))
        _randomise_adapters(model)
        for layer in model.model.layers:
            layer.self_attn.q_proj.effilora_B[0].requires_grad_(False)
        x = torch.randint(0, 128, (2, 9))
        model(x, labels=x).loss.backward()
        grads.append(model.effilora_shared_a["in32"].grad)
    assert grads[0] is not None and grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_bf16_base_with_fp32_adapters_and_with_base_dtype():
    for adapter_dtype, expected in (("float32", torch.float32), ("base", torch.bfloat16)):
        model = tiny_llama().to(torch.bfloat16)
        apply_adapter(model, EffiLoRAConfig(rank=4, adapter_dtype=adapter_dtype))
        _randomise_adapters(model)
        assert {p.dtype for n, p in model.named_parameters() if is_adapter_param(n)} == {expected}
        x = torch.randint(0, 128, (2, 9))
        out = model(x, labels=x)
        assert out.logits.dtype == torch.bfloat16
        out.loss.backward()
        assert model.effilora_shared_a["q_proj"].grad.dtype == expected


def test_lily_reports_extra_local_projections_when_depth_does_not_divide():
    model = tiny_llama(layers=6)
    report = apply_adapter(model, LilyConfig(rank=4, num_a=4, num_b=2, target_modules=["q_proj"]))
    # stride 6 // 4 = 1, as in the reference: one LP per layer, six instead of four
    assert report.extras["lily_num_lp"] == {"q_proj": 6}
    model = tiny_llama(layers=8)
    assert apply_adapter(model, LilyConfig(rank=4, num_a=4, num_b=2, target_modules=["q_proj"])).extras[
        "lily_num_lp"
    ] == {"q_proj": 4}


def test_lily_masked_routing_ignores_padding_only_when_asked():
    x = torch.randint(0, 128, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, -4:] = 0
    logits = {}
    for masked in (False, True):
        model = tiny_llama()
        apply_adapter(model, LilyConfig(rank=4, num_a=1, num_b=3, masked_routing=masked))
        _randomise_adapters(model)
        logits[masked] = model(x, attention_mask=mask).logits
        full = model(x, attention_mask=torch.ones_like(mask)).logits
        logits[(masked, "full")] = full
    assert not torch.allclose(logits[False][0], logits[True][0])  # padding changed the batch mean
    torch.testing.assert_close(logits[(False, "full")], logits[(True, "full")])


def test_llava_shaped_model_never_gets_adapters_in_vision_tower_or_projector():
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=32)
    model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=tiny_llama_config()))
    for cfg in (LoRAConfig(rank=4, target_modules="all-linear"), EffiLoRAConfig(rank=4, target_modules=["q_proj"])):
        m = LlavaForConditionalGeneration(model.config)
        report = apply_adapter(m, cfg)
        assert report.wrapped and all("language_model" in n for n in report.wrapped), report.wrapped
        wrapped_in_vision = [n for n, mod in m.named_modules() if isinstance(mod, AdapterLinear) and "vision" in n]
        assert wrapped_in_vision == []
        assert not any("lm_head" in n for n in report.wrapped)


def _llama3_8b_on_meta():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8)
    with torch.device("meta"):
        return LlamaForCausalLM(cfg)


QKVUD = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize(
    "cfg, expected",
    [
        (LoRAConfig(rank=16, target_modules=QKVUD), 28_311_552),
        (LoRAConfig(rank=32, target_modules=QKVUD), 56_623_104),
        (EffiLoRAConfig(rank=16, target_modules=QKVUD), 13_074_432),
        (EffiLoRAConfig(rank=16, target_modules=QKVUD, share_a_by="in_features"), 12_877_824),
        # HydraLoRA per module: r d_in + N r d_out + N d_in; 32 layers of gate, up, down at r=4, N=4
        (HydraLoRAConfig(), 32 * ((4 * 4096 + 16 * 14336 + 4 * 4096) * 2 + (4 * 14336 + 16 * 4096 + 4 * 14336))),
        # Lily q,k,v r=16, 4 LP, 4 HP: n_LP d_in r + ne_2 r d_out + L r ne_2 per type
        (LilyConfig(), 3 * (4 * 4096 * 16 + 32 * 16 * 4) + 4 * 16 * (4096 + 1024 + 1024)),
    ],
    ids=["lora16", "lora32", "effilora16", "effilora16_in_features", "hydralora", "lily"],
)
def test_trainable_parameter_counts_match_methods_md_on_llama3_8b_shapes(cfg, expected):
    report = apply_adapter(_llama3_8b_on_meta(), cfg)
    assert report.trainable == expected


def test_lily_reference_recipe_is_about_1_19m():
    assert apply_adapter(_llama3_8b_on_meta(), LilyConfig()).trainable == 1_185_792


@pytest.mark.parametrize("cfg", [LoRAConfig(rank=4, target_modules=["q_proj", "v_proj", "down_proj"]),
                                 EffiLoRAConfig(rank=4), EffiLoRAConfig(rank=4, share_a_by="in_features")],
                         ids=["lora", "effilora", "effilora_in_features"])
def test_in_place_low_rank_add_equals_out_plus_delta(monkeypatch, cfg):
    """The fused forward (one addmm/baddbmm into the base output) changes speed, not arithmetic: same
    logits and the same gradient for every adapter tensor as ``out + delta(x)``."""
    results = []
    for in_place in (True, False):
        if not in_place:
            monkeypatch.setattr(AdapterLinear, "_can_add_in_place", lambda self, out, b: False)
        model = tiny_llama()
        apply_adapter(model, cfg)
        _randomise_adapters(model)
        x = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
        wrapped = [m for m in model.modules() if isinstance(m, AdapterLinear)]
        calls: list[str] = []
        record = calls.append
        hooks = [m.register_forward_hook(lambda m, a, o, record=record: record(o.grad_fn.name())) for m in wrapped]
        out = model(x, labels=x)
        out.loss.backward()
        for h in hooks:
            h.remove()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if is_adapter_param(n)}
        results.append((out.logits.detach(), grads, calls))
    (logits, grads, calls), (ref_logits, ref_grads, ref_calls) = results
    assert all(c in ("BaddbmmBackward0", "AddmmBackward0") for c in calls)  # the fused path really ran
    assert all(c == "AddBackward0" for c in ref_calls)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-6)


def test_in_place_add_is_refused_where_it_would_be_unsafe_or_wrong():
    layer = tiny_llama()
    apply_adapter(layer, LoRAConfig(rank=4, target_modules=["q_proj"]))
    q = layer.model.layers[0].self_attn.q_proj
    b = q.lora_B
    out = torch.zeros(2, 3, b.shape[0])
    assert q._can_add_in_place(out, b)
    assert not q._can_add_in_place(out[:, :2], b)  # a view: in place would write through to its base
    assert not q._can_add_in_place(out.bfloat16(), b)  # bf16 base with fp32 adapters: add after the cast
    handle = q.base_layer.register_forward_hook(lambda m, a, o: None)  # someone may keep the output
    assert not q._can_add_in_place(out, b)
    handle.remove()
    with torch.no_grad():
        b.normal_()
    tokens = torch.randn(5, q.in_features)  # 2-D input: the addmm_ branch
    torch.testing.assert_close(q(tokens), q.base_layer(tokens) + q.delta(tokens), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cfg", [LoRAConfig(rank=4, target_modules=["q_proj"]), EffiLoRAConfig(rank=4, target_modules=["q_proj"])],
                         ids=["lora", "effilora"])
def test_not_in_place_path_projects_the_input_once(cfg):
    """bf16 base with fp32 adapters takes the out-of-place add; it must reuse h = A x, not compute it again."""
    model = tiny_llama().to(torch.bfloat16)
    apply_adapter(model, cfg)
    q = model.model.layers[0].self_attn.q_proj
    projections = []
    q.dropout.register_forward_hook(lambda m, a, o: projections.append(1))  # runs once per A x
    out = q(torch.randn(2, 3, q.in_features, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and len(projections) == 1
