"""The causal-LM loss without (tokens x vocab) logits: LM head and cross-entropy fused per chunk of tokens.

LLaMA-3's 128,256-word vocabulary makes the logits the largest activation of an adapter step (batch 8 x 2048
tokens: 8 GB of fp32 logits, and as much again for their gradient). Here they only ever exist one chunk at a
time::

    hidden (n, H): the rows whose target counts
      ├─ chunk 0 (c, H) @ W.T ─► logits (c, V) fp32 ─► loss += logsumexp - z_target
      │                                  └─► in place: softmax - onehot(target) = dloss/dlogits
      │                                        ─► grad_h[chunk] = g @ W   (grad_W += g.T @ h if W trains)
      ├─ chunk 1 ...   (each chunk's (c, V) buffer is freed before the next one)
    backward: scale the kept grad_h (n, H) by the incoming gradient

The gradients are computed while each chunk's logits are at hand, as Liger-Kernel does: the head costs the same
matmuls as the plain path. ``recompute=True`` instead keeps only the hidden rows and each row's logsumexp and
redoes the chunk's logits in backward (one more head matmul per step, nothing but (n,) kept besides the rows).

The result is HF's ``model(..., labels=labels).loss`` (transformers' ``ForCausalLMLoss``): labels shifted by one,
-100 ignored, logits computed in the head's (or autocast's) dtype and upcast to fp32, the sum divided by the
number of counted tokens (or by ``num_items_in_batch`` when given). As there, a batch with no counted token
gives NaN. Rows that do not count are never multiplied by the head: with prompt tokens masked, most of them.

On CUDA with the optional ``liger_kernel`` package importable, Liger's fused Triton kernel takes the chunks.

Pure PyTorch (no lightning, no transformers): :class:`ChunkedLossHead` is an ``nn.Linear`` that holds the
model's own head weight and, inside ``computing_loss(labels)``, returns the loss instead of logits, so the
loss is computed inside the model's forward, where FSDP has gathered the head.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["IGNORE_INDEX", "ChunkedLossHead", "chunked_lm_loss", "find_loss_head", "install_chunked_loss_head"]

IGNORE_INDEX = -100  # HF's ignore_index: labels that do not count
# Hugging Face causal LMs whose forward returns the head's output untouched as `logits` (no soft-capping, no
# logit scaling after the head), so that a head returning the loss yields exactly the loss
PASS_THROUGH_HEADS = ("llama", "mistral", "qwen2", "qwen3")


def chunked_lm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    chunk_size: int = 1024,
    ignore_index: int = IGNORE_INDEX,
    num_items_in_batch: torch.Tensor | int | None = None,
    shift: bool = True,
    use_liger: bool = True,
    recompute: bool = False,
) -> torch.Tensor:
    """Mean causal-LM cross-entropy of ``hidden @ weight.T + bias`` against ``labels``, ``chunk_size`` tokens at a time.

    Args:
        hidden: final hidden states (..., T, H) (after the last norm).
        weight: the LM head weight (V, H); it gets a gradient only if it requires one.
        labels: (..., T) token ids, ``ignore_index`` where a position does not count.
        bias: optional head bias (V,).
        chunk_size: tokens whose logits exist at once (memory: chunk_size x V fp32, about twice).
        num_items_in_batch: divide the sum by this instead of the counted tokens (HF's gradient accumulation).
        shift: position t predicts label t + 1 (HF causal LMs); False: labels are already the targets.
        use_liger: on CUDA, use liger_kernel's fused linear cross-entropy when it is importable.
        recompute: keep nothing of the logits' gradient from forward and redo each chunk's logits in backward
            (one more head matmul); default: forward computes the gradients while it has each chunk's logits.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size}")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels {tuple(labels.shape)} do not match hidden states {tuple(hidden.shape)}: "
                         "one label per position expected")
    if shift:  # position t predicts token t + 1; the last position predicts nothing
        labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    targets = labels.reshape(-1).to(hidden.device)
    rows = (targets != ignore_index).nonzero().squeeze(1)  # (n,): one host sync, to size the chunks
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)  # (n, H); its backward scatters into hidden
    t = targets.index_select(0, rows)  # (n,)
    divisor = rows.numel() if num_items_in_batch is None else num_items_in_batch
    if torch.is_tensor(divisor):
        divisor = divisor.to(hidden.device)
    liger = _liger_loss() if use_liger and hidden.is_cuda else None
    if liger is not None:
        total = liger(h, weight, t, bias=bias, ignore_index=ignore_index, reduction="sum")
        total = total[0] if isinstance(total, tuple) else total
    else:
        total = _LinearCrossEntropySum.apply(h, weight, bias, t, chunk_size, _compute_dtype(hidden), recompute)
    return total.float() / divisor


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype ``F.linear(hidden, weight)`` would compute in here: autocast's when it is on, else the input's."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return hidden.dtype


@functools.cache
def _liger_loss() -> Any:
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError:  # optional: never a dependency
        return None
    return liger_fused_linear_cross_entropy


class _LinearCrossEntropySum(torch.autograd.Function):
    """sum_i [logsumexp(h_i W^T + b) - (h_i W^T + b)[t_i]] over rows h (n, H), chunk by chunk; no ignored rows.

    The gradient of that sum is ``softmax(z) - onehot(t)`` per row, which each chunk has in hand right after its
    loss. By default (``recompute=False``) the forward turns it into the chunk's grad_h (and grad_W, grad_b) at
    once, so the logits are computed once and backward only scales what it kept by the incoming gradient: the
    head's matmuls as in the plain path (2 per step with a frozen head), held memory (n, H). ``recompute=True``
    keeps only hidden rows and their logsumexp and redoes each chunk's logits in backward: one more matmul.
    """

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                chunk_size: int, dtype: torch.dtype, recompute: bool) -> torch.Tensor:
        ctx.chunk_size, ctx.dtype, ctx.rows = chunk_size, dtype, h.shape[0]
        ctx.eager = any(ctx.needs_input_grad[:3]) and not recompute
        grads = _Grads(h, weight, bias, ctx.needs_input_grad[:3], dtype) if ctx.eager else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        lse = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)  # (n,)
        for start in range(0, h.shape[0], chunk_size):
            end = start + chunk_size
            logits = _chunk_logits(h[start:end], weight, bias, dtype)  # (c, V) fp32
            target_logit = logits.gather(1, targets[start:end, None]).squeeze(1)  # (c,)
            lse[start:end] = _lse_(logits, softmax=grads is not None)  # in place: one (c, V) buffer, not two
            total += (lse[start:end] - target_logit).sum()
            if grads is not None:
                grads.add_chunk(start, end, logits, targets[start:end])
            del logits
        if grads is not None:
            ctx.save_for_backward(*grads.tensors())
        else:
            ctx.save_for_backward(h, weight, bias, targets, lse)
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if ctx.eager:  # d(sum)/d(inputs) was computed in forward; the loss is linear in it
            grads = ctx.saved_tensors
            if ctx.rows > 0:  # no rows: zeros stay zeros (as HF's), even times the inf of 1 / 0 tokens
                grads = [g * grad_total if g is not None else None for g in grads]
        else:
            h, weight, bias, targets, lse = ctx.saved_tensors
            acc = _Grads(h, weight, bias, ctx.needs_input_grad[:3], ctx.dtype)
            for start in range(0, h.shape[0], ctx.chunk_size):
                end = start + ctx.chunk_size
                g = _chunk_logits(h[start:end], weight, bias, ctx.dtype)  # (c, V) fp32, recomputed
                g.sub_(lse[start:end, None]).exp_()  # softmax
                acc.add_chunk(start, end, g.mul_(grad_total), targets[start:end], scale=grad_total)
                del g
            grads = acc.tensors()
        return (*grads, None, None, None, None)


class _Grads:
    """Gradients of the loss sum w.r.t. (h, weight, bias), accumulated chunk by chunk (None where not needed)."""

    def __init__(self, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, needed: tuple[bool, ...],
                 dtype: torch.dtype) -> None:
        self.h, self.weight, self.bias, self.dtype = h, weight, bias, dtype
        self.w = weight.to(dtype)  # a no-op unless autocast computes in another dtype
        self.grad_h = torch.empty_like(h) if needed[0] else None
        self.grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if needed[1] else None
        self.grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=h.device) if needed[2] else None

    def add_chunk(self, start: int, end: int, probs: torch.Tensor, targets: torch.Tensor,
                  scale: torch.Tensor | float = 1.0) -> None:
        """``probs``: (c, V) fp32 softmax of the chunk (times ``scale``), overwritten by its logits' gradient."""
        rows = torch.arange(probs.shape[0], device=probs.device)
        probs[rows, targets] -= scale  # softmax - onehot(target)
        if self.grad_b is not None:
            self.grad_b += probs.sum(0)
        g = probs.to(self.dtype)  # the gradient meets the matmuls in their dtype, as through HF's .float()
        if self.grad_h is not None:
            self.grad_h[start:end] = g @ self.w  # (c, H)
        if self.grad_w is not None:
            self.grad_w += g.t() @ self.h[start:end].to(self.dtype)  # (V, H), summed over chunks in fp32

    def tensors(self) -> tuple[torch.Tensor | None, ...]:
        grad_w = self.grad_w.to(self.weight.dtype) if self.grad_w is not None else None
        grad_b = self.grad_b.to(self.bias.dtype) if self.grad_b is not None else None
        return self.grad_h, grad_w, grad_b


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype
                  ) -> torch.Tensor:
    """(c, H) -> (c, V) logits computed in ``dtype`` (autocast off: the dtype is explicit), upcast to fp32."""
    with torch.autocast(h.device.type, enabled=False):
        b = bias.to(dtype) if bias is not None else None
        return F.linear(h.to(dtype), weight.to(dtype), b).float()


def _lse_(logits: torch.Tensor, softmax: bool) -> torch.Tensor:
    """Row-wise logsumexp of (c, V) fp32 logits, overwriting them with exp(z - max), or the softmax."""
    top = logits.amax(dim=1, keepdim=True)  # (c, 1)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # rows of -inf stay -inf, not NaN
    sums = logits.sub_(top).exp_().sum(dim=1, keepdim=True)  # (c, 1)
    if softmax:
        logits.div_(sums)
    return sums.log_().add_(top).squeeze(1)


class ChunkedLossHead(nn.Linear):
    """An LM head (``nn.Linear``) that returns the chunked causal-LM loss instead of logits while asked to.

    It holds the model's own head parameters (same objects, same state-dict keys, ties kept), so swapping it in
    changes nothing outside ``computing_loss``: generation and every other call get ``F.linear`` logits. The
    loss is thus computed inside the model's forward, where FSDP2 (root group) and FSDP1 (the head's own unit)
    have gathered the head, and the loss is what their backward hooks see.

    Example::

        head = ChunkedLossHead.from_linear(model.lm_head, chunk_size=1024)
        model.lm_head = head
        with head.computing_loss(labels):
            loss = model(input_ids=ids, attention_mask=mask).logits  # a scalar: the mean loss
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, chunk_size: int = 1024,
                 device: Any = None, dtype: torch.dtype | None = None, recompute: bool = False) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.chunk_size = chunk_size
        self.recompute = recompute  # see chunked_lm_loss
        self._request: tuple[torch.Tensor, torch.Tensor | int | None] | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, chunk_size: int = 1024) -> ChunkedLossHead:
        """A head sharing ``linear``'s weight and bias Parameters (no copy; built on meta, then given them)."""
        head = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, chunk_size=chunk_size,
                   device="meta")
        head.weight = linear.weight
        if linear.bias is not None:
            head.bias = linear.bias
        head.train(linear.training)
        return head

    @contextlib.contextmanager
    def computing_loss(self, labels: torch.Tensor, num_items_in_batch: torch.Tensor | int | None = None
                       ) -> Iterator[None]:
        """While inside, a call returns the mean loss of its hidden states (B, T, H) against ``labels`` (B, T)."""
        self._request = (labels, num_items_in_batch)
        try:
            yield
        finally:
            self._request = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self._request is None:
            return F.linear(hidden, self.weight, self.bias)
        labels, num_items = self._request
        return chunked_lm_loss(hidden, self.weight, labels, self.bias, chunk_size=self.chunk_size,
                               num_items_in_batch=num_items, recompute=self.recompute)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, chunk_size={self.chunk_size}"


def install_chunked_loss_head(model: nn.Module, chunk_size: int, on_skip: Callable[[str], Any] | None = None
                              ) -> ChunkedLossHead | None:
    """Swap a Hugging Face causal LM's ``lm_head`` for a :class:`ChunkedLossHead` with the same parameters.

    Do it before any sharding. Returns the new head, or None (and tells ``on_skip`` why) when the model is not
    one whose forward passes the head's output through untouched, or its head is not a plain ``nn.Linear``
    (an adapter wraps it): the caller then keeps HF's own loss.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    reason = None
    if model_type not in PASS_THROUGH_HEADS:
        reason = f"model_type {model_type!r} is not one of {PASS_THROUGH_HEADS} (its forward may transform logits)"
    elif type(head) is not nn.Linear:
        reason = f"its output head is a {type(head).__name__}, not a plain nn.Linear"
    if reason is not None:
        if on_skip is not None:
            on_skip(f"chunked_loss: {type(model).__name__} keeps the plain loss: {reason}.")
        return None
    chunked = ChunkedLossHead.from_linear(head, chunk_size)
    model.set_output_embeddings(chunked)
    return chunked


def find_loss_head(model: nn.Module | None) -> ChunkedLossHead | None:
    """The model's :class:`ChunkedLossHead` (inside an FSDP1 unit too), or None."""
    if model is None:
        return None
    return next((m for m in model.modules() if isinstance(m, ChunkedLossHead)), None)
