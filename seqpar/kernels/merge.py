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


def merge_all(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge a list of ``(out, lse)`` partials over disjoint key sets."""
    if not parts:
        raise ValueError("merge_all needs at least one (out, lse) pair")
    out, lse = None, None
    for block_out, block_lse in parts:
        out, lse = merge_partials(out, lse, block_out, block_lse)
    return out, lse
