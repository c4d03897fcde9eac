"""Sequence-parallel attention primitives, one algorithm per module.

Every primitive takes this rank's shard ``q [B, L/N, H, D]``, ``k, v [B, L/N, Hkv, D]`` and an explicit SP
``group`` (None = one device) and returns this rank's shard of the output, with an exact backward.
Names resolve lazily so that importing one primitive does not import the others.
"""

from __future__ import annotations

import importlib

_WHERE = {
    "ring_self_attention": "seqpar.attention.rsa",
    "ring_attention": "seqpar.attention.ring",
    "ulysses_attention": "seqpar.attention.ulysses",
    "usp_attention": "seqpar.attention.usp",
    "allgather_attention": "seqpar.attention.allgather",
    "lasp2_linear_attention": "seqpar.attention.lasp2",
    "lasp1_linear_attention": "seqpar.attention.lasp1",
    "shift_short_attention": "seqpar.attention.shift_short",
    "sink_shift_attention": "seqpar.attention.sink_shift",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'seqpar.attention' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)


def __dir__() -> list[str]:
    return __all__
