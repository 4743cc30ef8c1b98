"""On CUDA: packed loss batches (``batch.pack``) give the padded batch's loss and gradients with the attention
kernels a GPU run uses: SDPA in fp32 and under bf16 autocast, ``sdpa_packed`` (in fp32 one causal SDPA call per
sample; under bf16 autocast one call of PyTorch's variable-length flash kernel per layer; the batch in rows or in
one row), and FlashAttention-2 when the package is installed (variable-length attention from the packed
``position_ids``)."""

from __future__ import annotations

import functools
import importlib.util

import numpy as np
import pytest
import torch
from gpu_helpers import CUDA, GPU_MARKS
from helpers import tiny_llama

from effilora_lightning.data.batch import IGNORE_INDEX, model_inputs, pack, pad, pad_mask
from effilora_lightning.models import packed_attention
from effilora_lightning.models.packed_attention import SDPA_PACKED

pytestmark = GPU_MARKS


def _batches(seed: int = 0, width: int = 28) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = np.random.default_rng(seed)
    ids = [g.integers(3, 128, n) for n in (9, 3, 14, 5, 5, 2, 11, 7)]
    labels = [np.where(np.arange(len(x)) < len(x) // 2, IGNORE_INDEX, x) for x in ids]
    padded = {"input_ids": pad(ids, 0, "right"), "attention_mask": pad_mask(ids, "right"),
              "labels": pad(labels, IGNORE_INDEX, "right")}
    packed = pack(ids, labels, pad_id=0, width=width)
    return ({k: v.cuda() for k, v in padded.items()},
            {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in packed.items()})


def _loss_and_grads(model, batch, autocast: bool, segments: bool = False):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        loss = model(**model_inputs(batch, segments), labels=batch["labels"]).loss
    loss.backward()
    return loss.detach().float(), [p.grad.float().clone() for p in model.parameters()]


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
def test_packed_equals_padded_with_sdpa(autocast):
    model = tiny_llama(layers=2, attn_implementation="sdpa").cuda().train()
    padded, packed = _batches()
    want_loss, want = _loss_and_grads(model, padded, autocast)
    got_loss, got = _loss_and_grads(model, packed, autocast)
    tol = dict(rtol=2e-2, atol=2e-3) if autocast else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_loss, want_loss, **tol)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **tol)


@pytest.mark.parametrize("width", [28, 56], ids=["rows", "one_row"])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
def test_packed_equals_padded_with_sdpa_packed(autocast, width):
    sdpa = tiny_llama(layers=2, attn_implementation="sdpa").cuda().train()
    packed_sdpa = tiny_llama(layers=2, attn_implementation=SDPA_PACKED).cuda().train()
    padded, packed = _batches(width=width)
    want_loss, want = _loss_and_grads(sdpa, padded, autocast)
    got_loss, got = _loss_and_grads(packed_sdpa, packed, autocast, segments=True)
    tol = dict(rtol=2e-2, atol=2e-3) if autocast else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_loss, want_loss, **tol)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **tol)


@pytest.mark.parametrize("width", [28, 56], ids=["rows", "one_row"])
def test_bf16_sdpa_packed_is_one_varlen_flash_call_per_layer_and_equals_the_per_sample_loop(monkeypatch, width):
    """Under bf16 autocast on this GPU the varlen kernel is chosen (one call per layer: 2 forward calls) and gives
    the per-sample SDPA loop's loss and gradients within bf16 rounding."""
    if packed_attention._varlen_attn is None:
        pytest.skip("this torch has no torch.nn.attention.varlen")
    model = tiny_llama(layers=2, attn_implementation=SDPA_PACKED).cuda().train()
    _, packed = _batches(width=width)
    calls = []
    real = packed_attention._varlen_attn
    assert packed_attention.varlen_style(real) is not None, f"torch {torch.__version__}'s varlen_attn: no causal argument"

    @functools.wraps(real)  # the same signature, which varlen_style reads
    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(packed_attention, "_varlen_attn", counted)
    got_loss, got = _loss_and_grads(model, packed, autocast=True, segments=True)
    assert len(calls) == 2  # one per layer, the whole batch in each
    monkeypatch.setattr(packed_attention, "varlen_kernel_applies", lambda query, dropout, scaling=None: False)
    want_loss, want = _loss_and_grads(model, packed, autocast=True, segments=True)
    assert len(calls) == 2
    torch.testing.assert_close(got_loss, want_loss, rtol=2e-2, atol=2e-3)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=2e-2, atol=2e-3)


# (without CUDA the module's mark skips it, saying so: the GPU check's dry run counts that reason)
@pytest.mark.skipif(CUDA and importlib.util.find_spec("flash_attn") is None, reason="flash-attn is not installed")
def test_packed_flash_attention_2_equals_padded_sdpa():
    """FlashAttention-2 needs fp16/bf16: a bf16 model, against SDPA on the padded batch, bf16 tolerances."""
    sdpa = tiny_llama(layers=2, attn_implementation="sdpa").cuda().to(torch.bfloat16).train()
    flash = tiny_llama(layers=2, attn_implementation="flash_attention_2").cuda().to(torch.bfloat16).train()
    padded, packed = _batches()
    want_loss, want = _loss_and_grads(sdpa, padded, autocast=False)
    got_loss, got = _loss_and_grads(flash, packed, autocast=False)
    torch.testing.assert_close(got_loss, want_loss, rtol=2e-2, atol=2e-2)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=5e-2, atol=5e-3)
