"""What LongLoRA S2-Attn (``shift_short.py``) and SinkLoRA SF-Attn (``sink_shift.py``) share: the validated
plan of one call and the geometry of the shift groups.

A *shift group* is a run of G consecutive tokens (LongLoRA's "group size" G; "group" alone in seqpar means a
process group): heads ``[0, H/2)`` attend inside ``[jG, (j+1)G)``, heads ``[H/2, H)`` inside the same runs
shifted by G/2. Validation (``make_plan``) is one small all-gather of every argument that may differ across
ranks (``checks.check_same_values``), then local checks identical on every rank (``checks.check_shift_args``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from seqpar.attention.checks import check_same_values, check_shift_args, check_softmax_scale, tensor_fields
from seqpar.comm import Group, RingComm, group_rank
from seqpar.comm import group_size as sp_size  # ``group_size`` is G in LongLoRA's API
from seqpar.kernels import acc_dtype


@dataclass(frozen=True)
class ShiftPlan:
    """Validated arguments of one call, shared by S2-Attn and SF-Attn (kept on ``ctx``)."""

    group: Group  # the SP process group
    world: int
    rank: int
    local_len: int
    shift_size: int  # G: the size of a shift group (LongLoRA's "group size")
    wrap: bool
    num_sink_tokens: int
    softmax_scale: float | None

    @property
    def half(self) -> int:
        return self.shift_size // 2

    def halo_ring(self, *, backward: bool) -> RingComm:
        """Forward r -> r+1 (this rank's tail), backward r -> r-1 (its gradient back to its owner); an open
        ring unless ``wrap``: ``send_recv`` returns what arrives here, or None."""
        return RingComm(self.group, reverse=backward, wrap=self.wrap, op="halo")


def make_plan(q, k, v, *, group: Group, group_size: int, wrap: bool, num_sink_tokens: int,
              softmax_scale: float | None, caller: str, validate: bool = True) -> ShiftPlan:
    """Validate collectively (one small all-gather; skipped with ``validate=False``, when the caller already
    compared these arguments in this forward), then locally: every rank raises the same error."""
    if validate:
        check_same_values(group, caller, **tensor_fields(q=q, k=k, v=v), group_size=group_size,
                          num_sink_tokens=num_sink_tokens, wrap=int(bool(wrap)))
    check_softmax_scale(softmax_scale)
    world = sp_size(group)
    check_shift_args(q, k, v, shift_size=int(group_size), num_sink_tokens=int(num_sink_tokens), world=world,
                     caller=caller)
    return ShiftPlan(group, world, group_rank(group), q.shape[1], int(group_size), bool(wrap),
                     int(num_sink_tokens), softmax_scale)


def halo_bytes(k, *, group: Group, group_size: int, wrap: bool = False) -> tuple[int, int]:
    """(forward, backward) bytes of the halo this rank sends: ``h·e`` to r+1, then ``h·a`` back to r-1."""
    world, rank = sp_size(group), group_rank(group)
    if world == 1:
        return 0, 0
    h = k.shape[0] * (group_size // 2) * (k.shape[2] // 2) * k.shape[3] * 2
    fwd = h * k.element_size() if wrap or rank < world - 1 else 0
    return fwd, (h * acc_dtype(k.dtype).itemsize if wrap or rank > 0 else 0)


def group_start(pos: torch.Tensor, G: int, *, shifted: bool) -> torch.Tensor:
    """Global position of the first token of each token's shift group (no wrap)."""
    if not shifted:
        return pos // G * G
    return ((pos + G // 2) // G * G - G // 2).clamp_min(0)
