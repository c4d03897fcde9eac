"""Sequence-parallel batches and loss: shard a language-model batch over an SP group, and reduce the
cross-entropy over the group so that training equals single-device training on the whole sequence.

Labels are shifted on the WHOLE sequence before sharding (``labels[t] = input_ids[t + 1]``), because after
sharding token t + 1 may live on another rank (always, at a shard edge; zigzag also reorders chunks). The
model is then called with ``labels=None`` and the loss computed by ``sp_cross_entropy``::

    sp = shard_batch(batch, state, layout=patched_layout(model))
    labels = sp.pop("labels")
    logits = model(**sp, use_cache=False).logits          # [B, L/N, V]
    loss = sp_cross_entropy(logits, labels, state.sp_group)  # global mean, same value on every rank
    loss.backward()                                        # then SUM parameter grads over the SP group

Every rank of an SP group passes the SAME full batch (``[B, L]``); each keeps its shard ``[B, L/N]``.
Communication: ``shard_batch`` none; ``sp_cross_entropy`` one all-reduce of 2 float64 numbers
(``2 * 16 * (N-1)/N`` bytes sent per rank).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F

from seqpar.comm import Group, all_reduce_tensor, group_size
from seqpar.kernels.host import host_read
from seqpar.parallel import ParallelState
from seqpar.sharding import check_divisible, document_bounds, document_ids, remember_bounds, shard

IGNORE_INDEX = -100
Reduction = Literal["mean", "sum"]


def sp_group_of(parallel: ParallelState | dist.ProcessGroup | None) -> Group:
    """The SP group of ``parallel`` (a ParallelState, a process group, or None for one device)."""
    if parallel is None or isinstance(parallel, dist.ProcessGroup):
        return parallel
    if isinstance(parallel, ParallelState):
        return parallel.sp_group if parallel.sp_size > 1 else None
    raise TypeError(
        f"parallel={parallel!r} ({type(parallel).__name__}) is not a ParallelState, a process group or None: "
        "pass ParallelState.from_env(sp_size) or its .sp_group"
    )


def shard_batch(
    batch: Mapping[str, torch.Tensor | Sequence[int] | None],
    parallel: ParallelState | dist.ProcessGroup | None,
    layout: str,
) -> dict[str, torch.Tensor]:
    """This rank's shard of a causal-LM batch, with globally shifted labels and global position ids.

    Args:
        batch: ``input_ids [B, L]``; optional ``labels [B, L]`` (unshifted, HF convention, -100 = ignore;
            default ``input_ids``); optional ``attention_mask [B, L]`` (right padding only); optional packed
            documents, the same for every row: ``cu_seqlens`` (``[0, l1, l1 + l2, ..., L]``) or ``seq_lens``
            (``[l1, l2, ...]``); empty documents are allowed (``seqpar.sharding.document_ids``).
        parallel: ParallelState, SP process group, or None (one device).
        layout: ``"zigzag"`` or ``"contiguous"``, the layout the patched model runs with.

    Returns ``{"input_ids", "position_ids", "labels"}`` each ``[B, L/N]``, plus ``"cu_seqlens"`` (global
    boundaries, int32, unchanged by sharding) for packed documents. ``labels[t]`` is the next token, or -100
    for the last token, padding, and the last token of every document; position ids restart at 0 at each
    document. No attention mask is returned: causal attention never lets a real token see right padding.
    """
    ids = batch.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise ValueError(f"batch['input_ids'] must be a [B, L] tensor, got {_describe(ids)}")
    B, L = ids.shape
    group = sp_group_of(parallel)
    check_divisible(L, group_size(group), layout, name="input_ids length")
    labels = _shifted_labels(batch, ids)
    cu = _cu_seqlens(batch, L, ids.device)
    if cu is None:
        pos = torch.arange(L, device=ids.device)
    else:
        doc = document_ids(cu, L)  # validates: seqpar.sharding's one rule for packed documents
        pos = torch.arange(L, device=ids.device) - cu[doc]  # restart at 0 in every document
        labels[:, cu[1:] - 1] = IGNORE_INDEX  # no target across a document boundary
    out = {
        "input_ids": shard(ids, group=group, dim=1, layout=layout),
        "position_ids": shard(pos.expand(B, L), group=group, dim=1, layout=layout),
        "labels": shard(labels, group=group, dim=1, layout=layout),
    }
    if cu is not None:
        # the boundaries were read above: every layer of the patched forward plans from these host ints
        out["cu_seqlens"] = remember_bounds(cu.to(torch.int32), document_bounds(cu, L))
    return out


def _shifted_labels(batch: Mapping, ids: torch.Tensor) -> torch.Tensor:
    """``out[:, t] = labels[:, t + 1]``; -100 for the last token and wherever t or t + 1 is padding."""
    labels = batch.get("labels")
    labels = ids if labels is None else labels
    if not isinstance(labels, torch.Tensor) or labels.shape != ids.shape:
        raise ValueError(f"batch['labels'] must match input_ids {tuple(ids.shape)}, got {_describe(labels)}")
    out = torch.full_like(labels, IGNORE_INDEX)
    out[:, :-1] = labels[:, 1:]
    mask = batch.get("attention_mask")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.shape != ids.shape:
            raise ValueError(f"batch['attention_mask'] must match input_ids {tuple(ids.shape)}, got {_describe(mask)}")
        keep = mask.bool()
        if host_read((keep[:, 1:] & ~keep[:, :-1]).any(), "padding_check", lambda: False):
            raise ValueError(
                "batch['attention_mask'] has padding before real tokens (left padding or holes): seqpar applies "
                "no padding mask, so pad on the right (tokenizer.padding_side = 'right') or pack documents"
            )
        out[~keep] = IGNORE_INDEX
        out[:, :-1][~keep[:, 1:]] = IGNORE_INDEX
    return out


def _cu_seqlens(batch: Mapping, seq_len: int, device) -> torch.Tensor | None:
    """Global document boundaries from ``cu_seqlens`` or ``seq_lens`` (validated by ``document_ids``); None if none."""
    cu, lens = batch.get("cu_seqlens"), batch.get("seq_lens")
    if cu is not None and lens is not None:
        raise ValueError("batch has both 'cu_seqlens' and 'seq_lens': pass only one description of the documents")
    if cu is None and lens is None:
        return None
    if cu is None:
        known = _host_ints(lens)
        lens = torch.as_tensor(lens, dtype=torch.long, device=device)
        cu = torch.cat([lens.new_zeros(1), lens.cumsum(0)])
        known = None if known is None else tuple(itertools.accumulate(known, initial=0))
    else:
        known = _host_ints(cu)
        cu = torch.as_tensor(cu, dtype=torch.long, device=device)
    # Host ints given (a list): remembered, nothing is read. A tensor's boundaries are read once, by
    # ``document_ids`` (``host_bounds``: a host sync when it lives on a GPU).
    return cu if known is None or cu.dim() != 1 else remember_bounds(cu, known)


def _host_ints(x) -> tuple[int, ...] | None:
    """``x`` as Python ints if it is a flat sequence of numbers (not a tensor), else None."""
    if isinstance(x, torch.Tensor):
        return None
    try:
        return tuple(int(c) for c in x)
    except (TypeError, ValueError):
        return None


def _describe(x) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else f"{type(x).__name__}"


def sp_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    group: ParallelState | dist.ProcessGroup | None,
    *,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Mean next-token cross-entropy over the WHOLE sequence of the SP group (not a mean of rank means).

    ``logits [B, L/N, V]`` and ``labels [B, L/N]`` (already shifted by ``shard_batch``, -100 ignored). With
    S_r this rank's summed token loss and C the token count of the whole group, the returned value is
    ``sum_r S_r / C`` on every rank, while its gradient is that of ``S_r / C`` only. Contract: summing the
    parameter gradients over the SP ranks gives exactly the single-device gradient of the global mean
    (the trainer all-reduces SUM over SP, then averages over DP as usual). A batch with no target token
    returns 0 (C is clamped to 1) instead of NaN.

    ``reduction="sum"``: ``S_r`` itself (value and gradient), with no communication; the caller divides by
    a count it reduced itself (the trainer: the target tokens of a whole optimizer step, ``train_step``).
    """
    _check_reduction(reduction)
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree: logits must be "
            "[B, L/N, V] for labels [B, L/N] (call the model with labels=None and use shard_batch's labels)"
        )
    acc = torch.promote_types(logits.dtype, torch.float32)  # float64 models keep a float64 loss
    local = F.cross_entropy(logits.to(acc).flatten(0, -2), labels.flatten(), ignore_index=IGNORE_INDEX,
                            reduction="sum")
    if reduction == "sum":
        return local
    return sp_global_mean(local, (labels != IGNORE_INDEX).sum(), group)


def _check_reduction(reduction: str) -> None:
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction={reduction!r}: use 'mean' (the SP group's token mean) or 'sum' (this rank's "
                         "summed token loss, no communication)")


def sp_global_mean(local: torch.Tensor, count: torch.Tensor, group: ParallelState | dist.ProcessGroup | None
                   ) -> torch.Tensor:
    """``sum_r S_r / C`` in value, ``S_r / C`` in gradient, from this rank's summed loss ``local`` (a float32
    scalar with a graph, float64 for a float64 model: the result keeps its dtype) and its target count: the
    reduction ``sp_cross_entropy`` and ``sp_fused_linear_cross_entropy`` share (one all-reduce of 2 float64)."""
    stats = torch.stack([local.detach().double(), count.double()])
    stats = all_reduce_tensor(stats, sp_group_of(group))  # [sum of S_r, C]
    total = stats[1].clamp(min=1)
    # Value: the global mean, bit-identical on every rank (the second term is exactly 0).
    # Gradient: this rank's share S_r / C only.
    return (stats[0] / total).to(local.dtype) + (local - local.detach()) / total.to(local.dtype)
