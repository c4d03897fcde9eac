"""Tiled LM head + cross-entropy: the sequence-parallel loss without ever holding the ``[B, L/N, V]`` logits.

With a real vocabulary the largest tensors of a long-sequence step are the logits, their float32 copy and
their gradient (Llama 3: V = 128256, so ``[L/N, V]`` float32 is 32x the ``[L/N, d]`` hidden states). Here the
rows of ``hidden [B, L/N, d]`` are taken ``chunk_size`` at a time: logits ``[c, V]`` in float32, log-sum-exp,
the target logit and, while the chunk is at hand, its gradient ``softmax - onehot``, which is pushed straight
into ``d hidden`` (``[c, V] @ W``) and a float32 ``d W`` accumulator (``[c, V]^T @ h``); the chunk is then
freed. The gradient is computed in the forward (the loss is the last op of the graph) and only scaled by the
incoming gradient in the backward, so the head matmul is not recomputed (as Liger-Kernel's
FusedLinearCrossEntropy and DeepSpeed ALST's TiledFusedLogitsLoss do).

Contract (that of ``sp_cross_entropy``, which it shares the reduction with): the value is the mean over the
whole sequence of the SP group, the same on every rank; this rank's gradient is that of its own summed
loss over the global token count, so summing parameter gradients over SP gives the one-device gradient.

Why not DeepSpeed's ``TiledFusedLogitsLoss``: it writes the weight's gradient into ``.grad`` inside the
forward with an incoming gradient of 1 and scales only ``d hidden`` by the real incoming gradient, so any
scaling of the loss (our ``S x loss``, DeepSpeed's 1/grad_accum, fp16 loss scaling) leaves ``d W`` wrong;
and it averages per-shard means, which is not the token mean when shards hold different numbers of targets.

Memory: ``chunk_size x V x 4`` bytes for the chunk's logits (reused in place for the softmax), plus, when
the weight is not float32, ``chunk_size x V x 2`` for the cast gradient and ``V x d x 4`` for the float32
``d W`` accumulator; ``B x L/N x d`` for ``d hidden``. Communication: one all-reduce of 2 float64.

Bytes examples (Llama-3-8B head, L/N = 32768 tokens per rank, bf16): full logits path ``32768 x 128256 x
(2 + 4 + 4)`` = 42 GB; this path with ``chunk_size = 1024``: 0.8 GB of chunk + 2.1 GB of ``d W`` float32.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

from seqpar.models.batch import IGNORE_INDEX, Reduction, _check_reduction, sp_cross_entropy, sp_global_mean
from seqpar.parallel import ParallelState

DEFAULT_CHUNK = 1024


class FusedHeadError(ValueError):
    """The model's output head is not a plain linear layer, so the loss cannot be fused with it."""


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T + bias`` over the non-ignored rows, chunk by chunk.

    Shapes: ``hidden [R, d]``, ``weight [V, d]``, ``bias [V]`` or None, ``labels [R]``; returns a float32
    scalar. Saved for backward: ``d hidden [R, d]``, ``d weight [V, d]`` (float32), ``d bias [V]``.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_size: int):
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        want_b = bias is not None and ctx.needs_input_grad[2]
        # bf16 matmuls are emulated on CPU (slow): there, compute in float32; on GPU in the model's dtype.
        cdt = torch.float32 if hidden.device.type == "cpu" else weight.dtype
        w = weight.to(cdt)
        b = None if bias is None else bias.float()
        rows, vocab = hidden.shape[0], weight.shape[0]
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        d_h = torch.empty_like(hidden) if want_h else None
        d_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        d_b = torch.zeros(vocab, dtype=torch.float32, device=weight.device) if want_b else None
        for s in range(0, rows, chunk_size):
            h, y = hidden[s:s + chunk_size].to(cdt), labels[s:s + chunk_size]
            z = (h @ w.T).float()  # [c, V]: the only vocabulary-sized tensor alive
            if b is not None:
                z += b
            valid = y != IGNORE_INDEX
            target = y.clamp(min=0).unsqueeze(1)
            lse = torch.logsumexp(z, dim=-1)
            loss += ((lse - z.gather(1, target).squeeze(1)) * valid).sum()
            if not (want_h or want_w or want_b):
                continue
            g = z.sub_(lse.unsqueeze(1)).exp_()  # softmax, in place: d loss / d logits = softmax - onehot
            g.scatter_add_(1, target, -torch.ones_like(target, dtype=g.dtype))
            g *= valid.unsqueeze(1)
            if want_b:
                d_b += g.sum(0)
            gc = g.to(cdt)
            if want_h:
                d_h[s:s + chunk_size] = (gc @ w).to(hidden.dtype)
            if want_w:
                if cdt == torch.float32:
                    d_w.addmm_(gc.T, h)
                else:  # one [V, d] product per chunk in the model dtype, summed over chunks in float32
                    d_w += gc.T @ h
            del z, g, gc
        ctx.save_for_backward(d_h, d_w, d_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad):
        d_h, d_w, d_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        return (None if d_h is None else d_h * grad.to(d_h.dtype),
                None if d_w is None else d_w.mul_(grad).to(w_dtype),  # in place: no second [V, d] copy
                None if d_b is None else (d_b * grad).to(b_dtype), None, None)


def sp_fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    group: ParallelState | dist.ProcessGroup | None,
    *,
    bias: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """``sp_cross_entropy(hidden @ weight.T + bias, labels, group, reduction=...)`` without materialising the
    logits.

    Args:
        hidden: ``[B, L/N, d]`` the final hidden states (after the last norm), any float dtype.
        weight: ``[V, d]`` the LM head (tied embeddings: the embedding matrix); under ZeRO-3 it must be
            gathered: call the head through ``causal_lm_loss`` (or inside ``GatheredParameters``).
        labels: ``[B, L/N]`` from ``shard_batch`` (already shifted, -100 ignored).
        group: ParallelState, SP process group, or None (one device).
        bias: ``[V]`` or None.
        chunk_size: rows of ``B x L/N`` per tile; memory ``chunk_size x V x 4`` bytes per tile.
        reduction: ``"mean"`` (the SP group's token mean) or ``"sum"`` (this rank's summed loss, no
            communication), as ``sp_cross_entropy``.

    Returns the float32 global mean (same value on every rank); gradients flow to hidden, weight and bias
    with ``sp_cross_entropy``'s contract. Accumulation is float32 whatever the dtype.
    """
    _check_reduction(reduction)
    if hidden.shape[:-1] != labels.shape or hidden.dim() < 2:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} disagree: hidden must be "
                         "[B, L/N, d] for labels [B, L/N] (shard_batch's labels)")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        if getattr(weight, "ds_id", None) is not None:
            raise ValueError("the LM head weight is partitioned by ZeRO-3: compute the loss with "
                             "seqpar.models.causal_lm_loss(model, ...), which gathers it through the head module")
        raise ValueError(f"weight {tuple(weight.shape)} is not [V, d={hidden.shape[-1]}]: pass the LM head's weight")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r}: must be a positive number of rows (e.g. {DEFAULT_CHUNK})")
    flat_h, flat_y = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    if not torch.is_grad_enabled():  # eval: the value only (no gradient work or buffers in the forward)
        flat_h, weight = flat_h.detach(), weight.detach()
        bias = None if bias is None else bias.detach()
    local = _FusedLinearCrossEntropy.apply(flat_h, weight, bias, flat_y, chunk_size)
    if reduction == "sum":
        return local
    return sp_global_mean(local, (flat_y != IGNORE_INDEX).sum(), group)


def output_head(model: Any) -> torch.nn.Linear:
    """The ``nn.Linear`` that produces the logits (through a DeepSpeed engine, a peft model and peft's
    ``modules_to_save`` wrapper); FusedHeadError if it is anything else (e.g. LoRA on lm_head)."""
    model = getattr(model, "module", model)  # DeepSpeed engine
    head = model.get_output_embeddings()
    if hasattr(head, "modules_to_save") and hasattr(head, "active_adapters"):  # peft: the trained copy
        head = head.original_module if getattr(head, "disable_adapters", False) else \
            head.modules_to_save[head.active_adapters[0]]
    if not isinstance(head, torch.nn.Linear):
        raise FusedHeadError(f"memory.fused_loss needs the model's output head to be a torch.nn.Linear, got "
                             f"{type(head).__name__}: set memory.fused_loss=false (or leave lm_head out of "
                             "lora.targets)")
    return head


@contextmanager
def _head_returns_loss(head: torch.nn.Linear, labels: torch.Tensor, group, chunk_size: int, reduction: Reduction):
    """While active, calling ``head(hidden)`` returns the fused loss instead of logits. Running inside the
    head module's call is what lets ZeRO-3 gather its weight for the forward and again for the backward
    (its module hooks), as DeepSpeed's own TiledFusedLogitsLoss relies on."""

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        return sp_fused_linear_cross_entropy(hidden, head.weight, labels, group, bias=head.bias,
                                             chunk_size=chunk_size, reduction=reduction)

    head.forward = forward
    try:
        yield
    finally:
        del head.forward


def causal_lm_loss(
    model: Any,
    inputs: dict,
    labels: torch.Tensor,
    group: ParallelState | dist.ProcessGroup | None,
    *,
    chunk_size: int | None = None,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """The SP loss of a causal LM on this rank's shard: ``chunk_size=None`` computes full logits and
    ``sp_cross_entropy``; an integer fuses the head and the loss (``sp_fused_linear_cross_entropy``).

    ``model`` is a Hugging Face causal LM, a peft model or a DeepSpeed engine; ``inputs`` are
    ``shard_batch``'s outputs without ``labels``. ``reduction="sum"``: this rank's summed token loss, no
    communication (the trainer divides by the target count of the whole optimizer step).
    """
    _check_reduction(reduction)
    if chunk_size is None:
        return sp_cross_entropy(model(**inputs, use_cache=False).logits, labels, group, reduction=reduction)
    with _head_returns_loss(output_head(model), labels, group, chunk_size, reduction):
        loss = model(**inputs, use_cache=False).logits  # the head returned the loss: no logits exist
    if loss.dim() != 0:
        raise FusedHeadError(f"the model post-processed its head's output (got shape {tuple(loss.shape)}): set "
                             "memory.fused_loss=false for this model")
    return loss
