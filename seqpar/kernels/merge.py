"""Log-sum-exp merge of partial attention results (the online softmax of blockwise/ring attention).

If ``(o_a, lse_a)`` is attention of a query over key set A and ``(o_b, lse_b)`` over a disjoint set B, then
attention over A ∪ B is

    lse = log(exp(lse_a) + exp(lse_b))
    o   = exp(lse_a - lse) * o_a + exp(lse_b - lse) * o_b

Rows that saw no key at all carry ``lse = -inf`` and ``o = 0``; the merge keeps them that way instead of
producing NaN. Shapes: ``o [B, L, H, D]``, ``lse [B, H, L]``; both are kept in float32 (or float64) so that
bfloat16 rounding does not grow with the number of merged blocks.
"""

from __future__ import annotations

import torch


def merge_partials(
    out: torch.Tensor | None,
    lse: torch.Tensor | None,
    block_out: torch.Tensor,
    block_lse: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge a block's ``(block_out, block_lse)`` into the running ``(out, lse)``; None starts the sum."""
    acc = torch.float64 if block_lse.dtype == torch.float64 else torch.float32
    if out is None:
        return block_out.to(acc), block_lse.to(acc)
    block_out, block_lse = block_out.to(acc), block_lse.to(acc)
    new_lse = torch.logaddexp(lse, block_lse)
    # Rows still empty after the merge: keep weight 0 instead of exp(-inf - -inf) = NaN.
    safe = torch.where(torch.isinf(new_lse), torch.zeros_like(new_lse), new_lse)
    w_old = torch.exp(lse - safe).transpose(1, 2).unsqueeze(-1)
    w_new = torch.exp(block_lse - safe).transpose(1, 2).unsqueeze(-1)
    return out * w_old + block_out * w_new, new_lse


def merge_into(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor) -> None:
    """``merge_partials`` in place: ``out``/``lse`` (the accumulators, or views of their rows) take the merged
    result and ``block_out`` is consumed (scaled in place when it is already in the accumulation dtype). No
    temporary larger than ``[B, L, H]`` besides what a dtype cast of ``block_out`` needs."""
    block_lse = block_lse.to(lse.dtype)
    new_lse = torch.logaddexp(lse, block_lse)
    safe = torch.where(torch.isinf(new_lse), torch.zeros_like(new_lse), new_lse)
    w_old = torch.exp(lse - safe).transpose(1, 2).unsqueeze(-1)
    w_new = torch.exp(block_lse - safe).transpose(1, 2).unsqueeze(-1)
    out.mul_(w_old).add_(block_out.to(out.dtype).mul_(w_new))
    lse.copy_(new_lse)


def merge_sink(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Learned attention sinks (gpt-oss's ``s_aux``): one more logit ``s_h`` per head in every row's softmax
    denominator, with no value. That is one more partial ``(0, s_h)`` in the merge above:

        lse' = log(exp(lse) + exp(s_h)),   o' = exp(lse - lse') · o = sigmoid(lse - s_h) · o

    Merged once per query row, after all key blocks. FlashAttention-2's backward run with ``(o', lse')``
    in place of ``(o, lse)`` then gives the exact dQ, dK, dV (it recomputes p'_j = exp(z_j - lse') and
    delta' = rowsum(dO · o'), and the sink's value is 0); ``sink_grad`` gives d s_h.
    ``sinks [H]``; ``out [B, L, H, D]``, ``lse [B, H, L]`` (float32 or float64).
    """
    sink_lse = sinks.detach().to(lse.dtype).view(1, -1, 1).expand_as(lse)
    return merge_partials(out, lse, out.new_zeros(()), sink_lse)


def sink_grad(dout: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """d s_h = -Σ_rows p_sink · delta', with ``(out, lse)`` after ``merge_sink``: p_sink = exp(s_h - lse'),
    delta' = rowsum(dO · o'). Summed over this rank's rows (a parameter's gradient, summed over SP later)."""
    acc = lse.dtype
    delta = (dout.to(acc) * out.to(acc)).sum(-1).transpose(1, 2)  # [B, H, L]
    p_sink = torch.exp(sinks.detach().to(acc).view(1, -1, 1) - lse)
    return -(p_sink * delta).sum((0, 2)).to(sinks.dtype)


def merge_all(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge a list of ``(out, lse)`` partials over disjoint key sets."""
    if not parts:
        raise ValueError("merge_all needs at least one (out, lse) pair")
    out, lse = None, None
    for block_out, block_lse in parts:
        out, lse = merge_partials(out, lse, block_out, block_lse)
    return out, lse
