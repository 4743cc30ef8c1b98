"""effilora_lightning.losses: the chunked LM head + cross-entropy is HF's causal-LM loss, without full logits.

References are transformers' own ``ForCausalLMLoss`` (the loss ``model(..., labels=...)`` returns) on logits from
the same head; all fp32, tight tolerances.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.loss.loss_utils import ForCausalLMLoss

from effilora_lightning.losses import ChunkedLossHead, chunked_lm_loss, find_loss_head, install_chunked_loss_head

B, T, H, V = 4, 32, 16, 512  # N = 128 tokens; N x V (65,536) dwarfs the head weight V x H (8,192)
TIGHT = dict(rtol=1e-5, atol=1e-6)


def _inputs(bias: bool, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g).requires_grad_()
    weight = (torch.randn(V, H, generator=g) / H**0.5).requires_grad_()
    b = torch.randn(V, generator=g).requires_grad_() if bias else None
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :10] = -100  # a masked prompt
    labels[2] = -100  # a row that counts nowhere
    labels[3, 5:9] = -100  # a hole in the middle
    return hidden, weight, b, labels


def _hf_loss(hidden, weight, bias, labels, **kw) -> torch.Tensor:
    return ForCausalLMLoss(F.linear(hidden, weight, bias), labels, vocab_size=V, **kw)


def _grads(loss: torch.Tensor, *tensors: torch.Tensor | None) -> list[torch.Tensor]:
    present = [t for t in tensors if t is not None]
    return list(torch.autograd.grad(loss, present))


@pytest.mark.parametrize("recompute", [False, True], ids=["grads_in_forward", "recompute"])
@pytest.mark.parametrize("chunk_size", [1, 5, 16, 128, 10_000])  # 5 does not divide the 102 counted tokens
@pytest.mark.parametrize("bias", [False, True])
def test_loss_and_gradients_equal_hf_for_any_chunk_size(chunk_size, bias, recompute):
    hidden, weight, b, labels = _inputs(bias)
    ref = _hf_loss(hidden, weight, b, labels)
    loss = chunked_lm_loss(hidden, weight, labels, b, chunk_size=chunk_size, recompute=recompute)
    torch.testing.assert_close(loss, ref, **TIGHT)
    for got, want in zip(_grads(loss, hidden, weight, b), _grads(ref, hidden, weight, b), strict=True):
        torch.testing.assert_close(got, want, **TIGHT)


def test_ignored_rows_get_exactly_zero_gradient_and_the_mean_counts_only_labelled_tokens():
    hidden, weight, _, labels = _inputs(bias=False)
    loss = chunked_lm_loss(hidden, weight, labels, chunk_size=7)
    (grad,) = _grads(loss, hidden)
    assert torch.count_nonzero(grad[2]) == 0  # row 2 predicts nothing
    assert torch.count_nonzero(grad[:, -1]) == 0  # the last position has no next token
    counted = int((F.pad(labels, (0, 1), value=-100)[:, 1:] != -100).sum())
    total = chunked_lm_loss(hidden, weight, labels, chunk_size=7, num_items_in_batch=1)
    torch.testing.assert_close(total / counted, loss, **TIGHT)


@pytest.mark.parametrize("recompute", [False, True])
def test_num_items_in_batch_divides_the_sum_as_hf_does(recompute):
    hidden, weight, b, labels = _inputs(bias=True)
    for n in (37, torch.tensor(37)):
        ref = _hf_loss(hidden, weight, b, labels, num_items_in_batch=n)
        loss = chunked_lm_loss(hidden, weight, labels, b, chunk_size=9, num_items_in_batch=n, recompute=recompute)
        torch.testing.assert_close(loss, ref, **TIGHT)
        torch.testing.assert_close(_grads(loss, hidden)[0], _grads(ref, hidden)[0], **TIGHT)


@pytest.mark.parametrize("recompute", [False, True])
def test_a_batch_with_no_counted_token_is_nan_with_zero_gradients_like_hf(recompute):
    hidden, weight, _, labels = _inputs(bias=False)
    labels[:] = -100
    ref = _hf_loss(hidden, weight, None, labels)
    loss = chunked_lm_loss(hidden, weight, labels, chunk_size=8, recompute=recompute)
    assert torch.isnan(ref) and torch.isnan(loss)
    for got, want in zip(_grads(loss, hidden, weight), _grads(ref, hidden, weight), strict=True):
        torch.testing.assert_close(got, want)  # zeros on both sides


def test_frozen_weight_gets_no_gradient_and_unshifted_labels_are_targets():
    hidden, weight, _, labels = _inputs(bias=False)
    weight.requires_grad_(False)
    loss = chunked_lm_loss(hidden, weight, labels, chunk_size=11)
    loss.backward()
    assert weight.grad is None and hidden.grad is not None
    targets = F.pad(labels, (0, 1), value=-100)[:, 1:]
    torch.testing.assert_close(chunked_lm_loss(hidden, weight, targets, chunk_size=11, shift=False), loss, **TIGHT)


@pytest.mark.parametrize("recompute", [False, True])
def test_bf16_autocast_matches_hf_under_the_same_autocast(recompute):
    hidden, weight, _, labels = _inputs(bias=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _hf_loss(hidden, weight, None, labels)
        loss = chunked_lm_loss(hidden, weight, labels, chunk_size=16, recompute=recompute)
    assert loss.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=2e-3, atol=2e-3)  # bf16 logits, blocked differently
    torch.testing.assert_close(_grads(loss, hidden)[0], _grads(ref, hidden)[0], rtol=2e-2, atol=2e-3)


def _saved_numels(fn) -> list[tuple[int, tuple[int, ...]]]:
    """(numel, shape) of every tensor autograd saves for backward while ``fn`` runs."""
    saved: list[tuple[int, tuple[int, ...]]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append((t.numel(), tuple(t.shape)))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return saved


@pytest.mark.parametrize("recompute", [False, True])
def test_no_logits_sized_tensor_is_kept_for_backward(recompute):
    """The plain path keeps (N, V) logits (and their log-softmax); the chunked one only rows of (N, H) (hidden
    rows, or their gradient), the weight it was given and (N,) vectors: nothing vocabulary-sized but the weight."""
    hidden, weight, _, labels = _inputs(bias=False)
    weight.requires_grad_(False)  # a frozen head, as under adapters: no (V, H) gradient kept either
    n = B * T
    plain = _saved_numels(lambda: _hf_loss(hidden, weight, None, labels))
    chunked = _saved_numels(lambda: chunked_lm_loss(hidden, weight, labels, chunk_size=16, recompute=recompute))
    assert max(numel for numel, _ in plain) >= n * V
    assert all(shape == (V, H) or V not in shape for _, shape in chunked), chunked
    assert sum(numel for numel, shape in chunked if shape != (V, H)) < n * H + 4 * n


def test_bad_arguments_are_named():
    hidden, weight, _, labels = _inputs(bias=False)
    with pytest.raises(ValueError, match="chunk_size must be a positive"):
        chunked_lm_loss(hidden, weight, labels, chunk_size=0)
    with pytest.raises(ValueError, match=r"labels \(4, 31\) do not match hidden states \(4, 32, 16\)"):
        chunked_lm_loss(hidden, weight, labels[:, 1:])


def test_head_shares_the_parameters_returns_logits_outside_and_the_loss_inside():
    linear = torch.nn.Linear(H, V, bias=True)
    head = ChunkedLossHead.from_linear(linear, chunk_size=8)
    assert head.weight is linear.weight and head.bias is linear.bias
    assert list(head.state_dict()) == list(linear.state_dict())
    hidden, _, _, labels = _inputs(bias=False)
    torch.testing.assert_close(head(hidden), linear(hidden), rtol=0, atol=0)
    with head.computing_loss(labels):
        loss = head(hidden)
    torch.testing.assert_close(loss, _hf_loss(hidden, linear.weight, linear.bias, labels), **TIGHT)
    assert head(hidden).shape == (B, T, V)  # the request ends with the context


def _tiny_llama(tie: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tie)
    return LlamaForCausalLM(config)


@pytest.mark.parametrize("tie", [False, True])
def test_installed_head_gives_hf_loss_and_gradients_and_leaves_generation_alone(tie):
    model = _tiny_llama(tie)
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :4] = -100
    ref = model(input_ids=ids, labels=labels).loss
    ref_grads = _grads(ref, *model.model.layers[0].parameters())
    before = model.generate(ids[:, :5], max_new_tokens=4, do_sample=False)
    head = install_chunked_loss_head(model, chunk_size=5)
    assert find_loss_head(model) is head is model.lm_head
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    with head.computing_loss(labels):
        loss = model(input_ids=ids).logits
    torch.testing.assert_close(loss, ref, **TIGHT)
    for got, want in zip(_grads(loss, *model.model.layers[0].parameters()), ref_grads, strict=True):
        torch.testing.assert_close(got, want, **TIGHT)
    assert torch.equal(model.generate(ids[:, :5], max_new_tokens=4, do_sample=False), before)


def test_models_that_may_transform_logits_keep_their_head_and_say_why():
    model = _tiny_llama()
    model.config.model_type = "gemma2"  # soft-caps logits after the head
    said: list[str] = []
    assert install_chunked_loss_head(model, 8, on_skip=said.append) is None
    assert type(model.lm_head) is torch.nn.Linear and find_loss_head(model) is None
    assert said and "gemma2" in said[0] and "plain loss" in said[0]
