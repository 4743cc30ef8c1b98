"""``attn_implementation="sdpa_packed"`` (``models.packed_attention``): each packed sample attended on its own,
exactly as Hugging Face's block-masked SDPA computes it; padded batches and generation unchanged; the segments
from the batch (no host sync) or from position_ids; the setting checked up front and carried to the model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from effilora_lightning import CausalLMModule, LoRAConfig
from effilora_lightning.data.batch import IGNORE_INDEX, model_inputs, pack, pad, pad_mask
from effilora_lightning.models import packed_attention
from effilora_lightning.models.causal_lm import load_causal_lm
from effilora_lightning.models.packed_attention import SDPA_PACKED, segments_from_positions, varlen_kernel_applies

TINY = Path(__file__).resolve().parents[2] / "data" / "checkpoints" / "tiny-llama"


def _samples(seed: int, lengths=(9, 3, 14, 5, 5, 2, 11, 7, 1)) -> tuple[list[np.ndarray], list[np.ndarray]]:
    g = np.random.default_rng(seed)
    ids = [g.integers(3, 128, n) for n in lengths]
    return ids, [np.where(np.arange(len(x)) < len(x) // 2, IGNORE_INDEX, x) for x in ids]


@pytest.mark.parametrize("seed", range(6))
def test_the_batch_segments_are_what_the_positions_say(seed):
    """``pack``'s ``packed_segments`` (host ints) and the position_ids read back agree for any layout: the
    segments sum to the row's width and the tail is counted with the row's last sample."""
    g = np.random.default_rng(seed)
    ids = [g.integers(3, 128, int(n)) for n in g.integers(1, 30, int(g.integers(1, 12)))]
    for width in (None, 30, 45, 10_000):
        batch = pack(ids, ids, pad_id=0, width=width)
        rows, w = batch["input_ids"].shape
        assert len(batch["packed_segments"]) == rows and all(sum(r) == w for r in batch["packed_segments"])
        assert batch["packed_segments"] == segments_from_positions(batch["position_ids"])
        assert sum(len(r) for r in batch["packed_segments"]) == len(ids)


def test_a_width_of_the_whole_batch_leaves_no_padding():
    """pack_width >= the batch's tokens: no padding at all (one row, or narrower rows where they tie)."""
    ids, labels = _samples(0)
    batch = pack(ids, labels, pad_id=0, width=sum(len(x) for x in ids))
    assert batch["input_ids"].numel() == 57 and bool(batch["attention_mask"].all())
    assert sorted(n for row in batch["packed_segments"] for n in row) == sorted(len(x) for x in ids)


def test_packed_logits_equal_each_sample_alone(tiny_llama):
    """Every sample's logits in a one-row pack are its logits run alone (the definition, not just HF's mask)."""
    model = tiny_llama(layers=2, attn_implementation=SDPA_PACKED)
    ids, labels = _samples(1)
    batch = pack(ids, labels, pad_id=0, width=100)
    with torch.no_grad():
        logits = model(**model_inputs(batch, segments=True)).logits[0]
        start = 0
        for n in batch["packed_segments"][0]:
            alone = model(input_ids=batch["input_ids"][:, start:start + n]).logits[0]
            torch.testing.assert_close(logits[start:start + n], alone, rtol=1e-4, atol=1e-5)
            start += n


def test_a_padded_batch_and_generation_are_sdpa_s(tiny_llama):
    sdpa, packed = tiny_llama(layers=2), tiny_llama(layers=2, attn_implementation=SDPA_PACKED)
    ids, _ = _samples(2)
    right = {"input_ids": pad(ids, 0, "right"), "attention_mask": pad_mask(ids, "right")}
    left = {"input_ids": pad(ids, 0, "left"), "attention_mask": pad_mask(ids, "left")}
    with torch.no_grad():
        torch.testing.assert_close(packed(**right).logits, sdpa(**right).logits)
        got = packed.generate(**left, max_new_tokens=6, do_sample=False, pad_token_id=0)
        want = sdpa.generate(**left, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)


def test_given_segments_mean_no_host_read_of_the_positions(tiny_llama, monkeypatch):
    """With ``packed_segments`` the forward never reads position_ids back (no host sync per step); without them
    it reads them once per forward, not once per layer."""
    model = tiny_llama(layers=3, attn_implementation=SDPA_PACKED)
    ids, labels = _samples(3)
    batch = pack(ids, labels, pad_id=0, width=30)
    reads = []
    real_cpu = torch.Tensor.cpu

    def counting_cpu(self, *a, **kw):
        if self.dtype == torch.long and self.shape == batch["position_ids"].shape:
            reads.append(1)
        return real_cpu(self, *a, **kw)

    monkeypatch.setattr(torch.Tensor, "cpu", counting_cpu)
    with torch.no_grad():
        with_segments = model(**model_inputs(batch, segments=True)).logits
        assert reads == []
        from_positions = model(**model_inputs(batch)).logits
        assert reads == [1]  # three layers, one read
    torch.testing.assert_close(with_segments, from_positions)


def test_segments_that_do_not_fit_the_batch_are_refused(tiny_llama):
    model = tiny_llama(layers=1, attn_implementation=SDPA_PACKED)
    ids, labels = _samples(4)
    batch = pack(ids, labels, pad_id=0, width=30)
    wrong = tuple((*row[:-1], row[-1] + 1) for row in batch["packed_segments"])
    with pytest.raises(ValueError, match=r"packed_segments describe .* rows of \[.*\] tokens, but the batch has"):
        model(**(model_inputs(batch) | {"packed_segments": wrong}))


def test_the_setting_reaches_the_model_and_a_wrong_name_is_refused_up_front():
    assert load_causal_lm(str(TINY), None, "float32", 0, attn_implementation=SDPA_PACKED).config._attn_implementation \
        == SDPA_PACKED
    assert load_causal_lm(str(TINY), None, "float32", 0).config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match=r"CausalLMModule: attn_implementation must be null .* or one of "
                                         r"transformers' attention implementations .*got 'sdpa-packed'"):
        CausalLMModule(model_path=str(TINY), adapter=LoRAConfig(rank=2), attn_implementation="sdpa-packed")
    module = CausalLMModule(model_path=str(TINY), adapter=LoRAConfig(rank=2), attn_implementation=SDPA_PACKED)
    assert module.build_base_model().config._attn_implementation == SDPA_PACKED


def _documented_varlen_attn(calls: list[dict]):
    """What ``torch.nn.attention.varlen.varlen_attn`` computes by its documentation, on CPU (the kernel is CUDA
    only): (T, H, D) inputs, sample i = tokens [cu_seq[i], cu_seq[i + 1]), window (-1, 0) = causal; records what
    it was given."""
    def varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
        calls.append({"shape": tuple(q.shape), "kv_heads": k.shape[1], "cu": cu_q, "cu_k_is_cu_q": cu_k is cu_q,
                      "max": (max_q, max_k), "window": tuple(window_size), "gqa": enable_gqa, "scale": scale})
        assert tuple(window_size) == (-1, 0), "only causal attention is described here"
        bounds = cu_q.tolist()
        pieces = [F.scaled_dot_product_attention(*(x[a:b].transpose(0, 1)[None] for x in (q, k, v)), scale=scale,
                                                 is_causal=True, enable_gqa=enable_gqa)[0].transpose(0, 1)
                  for a, b in zip(bounds, bounds[1:])]
        return torch.cat(pieces)  # (T, H, D)
    return varlen_attn


@pytest.mark.parametrize("width", [30, 100], ids=["rows", "one_row"])
def test_where_the_flash_kernel_applies_one_varlen_call_per_layer_attends_the_batch(tiny_llama, monkeypatch, width):
    """On a GPU that can (fp16/bf16, sm80+) sdpa_packed makes ONE varlen_attn call per layer, not one SDPA call
    per sample: here the kernel as documented stands in for the CUDA one, so what is tested is what we hand it
    (layout, starts, longest piece, causal window, GQA, scale) and that loss and gradients are the per-sample
    path's. The real kernel runs in tests/gpu/test_gpu_packing.py."""
    ids, labels = _samples(5)
    batch = pack(ids, labels, pad_id=0, width=width)

    def loss_and_grads():
        model = tiny_llama(layers=3, attn_implementation=SDPA_PACKED).train()
        loss = model(**model_inputs(batch, segments=True), labels=batch["labels"]).loss
        loss.backward()
        return loss.detach(), [p.grad for p in model.parameters()]

    want_loss, want = loss_and_grads()  # the per-sample SDPA loop: this is CPU fp32
    calls: list[dict] = []
    monkeypatch.setattr(packed_attention, "_varlen_attn", _documented_varlen_attn(calls))
    monkeypatch.setattr(packed_attention, "varlen_kernel_applies", lambda query, dropout, scaling=None: True)
    got_loss, got = loss_and_grads()
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-6)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    rows, w = batch["input_ids"].shape
    lengths = [n for row in batch["packed_segments"] for n in row]
    assert len(calls) == 3  # one per layer
    for call in calls:
        assert call["shape"] == (rows * w, 4, 8) and call["kv_heads"] == 2 and call["gqa"]  # 4 heads of 8, 2 KV
        assert call["cu"] is calls[0]["cu"] and call["cu_k_is_cu_q"]  # one host-to-device copy per forward
        assert call["cu"].dtype == torch.int32 and call["cu"].tolist() == np.cumsum([0, *lengths]).tolist()
        assert call["max"] == (max(lengths), max(lengths)) and call["window"] == (-1, 0)
        assert call["scale"] == pytest.approx(8 ** -0.5)


def _older_varlen_attns(calls: list[dict]) -> dict[str, Any]:
    """Stand-ins with the signatures of earlier PyTorch releases (what they compute: ``_documented_varlen_attn``):
    2.10's positional ``is_causal`` without ``scale`` or ``enable_gqa``, and ``window_size`` without
    ``enable_gqa``. Neither can take GQA, so each refuses KV heads fewer than the query's."""
    documented = _documented_varlen_attn(calls)

    def torch_2_10(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False, return_aux=None):
        assert is_causal and k.shape[1] == q.shape[1], "this release's kernel takes no GQA"
        return documented(q, k, v, cu_q, cu_k, max_q, max_k, window_size=(-1, 0))

    def window_without_gqa(q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1)):
        assert k.shape[1] == q.shape[1], "this release's kernel takes no GQA"
        return documented(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale, window_size=window_size)

    return {"torch_2_10": torch_2_10, "window_without_gqa": window_without_gqa}


@pytest.mark.parametrize("release", ["torch_2_10", "window_without_gqa"])
def test_older_varlen_signatures_are_called_as_they_take_it(tiny_llama, monkeypatch, release):
    """The GPU image has had PyTorch 2.11, the CPU box 2.14: ``varlen_style`` reads the signature, so a release
    without ``enable_gqa`` gets the KV heads repeated and one without ``scale`` only the default scale (any
    other scale runs the per-sample loop); loss and gradients stay the per-sample path's."""
    ids, labels = _samples(5)
    batch = pack(ids, labels, pad_id=0, width=100)

    def loss_and_grads():
        model = tiny_llama(layers=2, attn_implementation=SDPA_PACKED).train()
        loss = model(**model_inputs(batch, segments=True), labels=batch["labels"]).loss
        loss.backward()
        return loss.detach(), [p.grad for p in model.parameters()]

    want_loss, want = loss_and_grads()
    calls: list[dict] = []
    kernel = _older_varlen_attns(calls)[release]
    monkeypatch.setattr(packed_attention, "_varlen_attn", kernel)
    style = packed_attention.varlen_style(kernel)
    assert style == packed_attention.VarlenStyle(
        {"is_causal": True} if release == "torch_2_10" else {"window_size": (-1, 0)},
        release != "torch_2_10", False)
    with monkeypatch.context() as m:  # the checks see a CUDA bf16 query on an sm80+ device
        m.setattr(packed_attention, "_flash_capable", lambda index: True)
        q = torch.zeros(1, 4, 8, 8, dtype=torch.bfloat16)
        m.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
        default_scale, other_scale = (packed_attention.varlen_kernel_applies(q, 0.0, s) for s in (8 ** -0.5, 0.5))
    assert default_scale and other_scale == style.scale  # without `scale`: only the default
    monkeypatch.setattr(packed_attention, "varlen_kernel_applies",  # the fp32 model through the kernel's call
                        lambda query, dropout, scaling=None: True)
    got_loss, got = loss_and_grads()
    monkeypatch.undo()
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-6)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    assert len(calls) == 2 and all(c["kv_heads"] == 4 and c["shape"][1] == 4 for c in calls)  # KV repeated 2x


def test_a_varlen_without_a_causal_argument_is_not_used():
    assert packed_attention.varlen_style(lambda q, k, v, cu_q, cu_k, max_q, max_k: q) is None
    assert packed_attention.varlen_style(None) is None


def test_the_flash_kernel_is_never_chosen_for_cpu_fp32_or_dropout():
    q = torch.zeros(1, 4, 8, 8)
    assert not varlen_kernel_applies(q, 0.0) and not varlen_kernel_applies(q.bfloat16(), 0.0)
    if torch.cuda.is_available():  # (the GPU suite's machine)
        assert not varlen_kernel_applies(q.cuda(), 0.0) and not varlen_kernel_applies(q.cuda().bfloat16(), 0.1)
