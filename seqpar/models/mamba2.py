"""The ``"ssd"`` seam: Mamba2 mixers (``Mamba2Mixer``; the near-copies in Bamba, Nemotron-H, Falcon-H1 and
GraniteMoeHybrid) run sequence-parallel in place, installed by ``patch_model`` through the family table
(``Family.linear``) and ``seqpar.models.hybrid.install``.

Seam: the mixer's forward calls two functions of its modeling module that carry everything sequence-mixing in
it, transformers' pure-PyTorch fallbacks of the causal-conv1d and mamba-ssm kernels:

* ``causal_conv1d_fn(x [B, C, n], weight, bias, activation)``, the depthwise conv over x/B/C: run by
  ``seqpar.attention.short_conv.causal_conv1d`` (halo of the previous rank's K-1 inputs; the dispatcher is
  ``seqpar.models.hybrid``'s, shared with Gated DeltaNet);
* ``mamba2_chunk_scan(x, dt, A, B, C, chunk_size, D, dt_bias, dt_softplus, dt_limit, ...)``, the SSD scan: Δ is
  formed as transformers does (bias, softplus, clamp) and the scan runs by ``seqpar.attention.ssd.ssd_scan``
  (one all-gather of per-rank affine maps).

These are narrower than ``mamba2_scan_forward`` / ``causal_conv1d_forward`` (which also read and write the
cache) and than the mixer's forward (projections, gated RMSNorm, output projection, all per token, stay the
model's own). Each module function is wrapped once by a dispatcher that runs seqpar's primitive only while a
patched mixer's forward is running (``hybrid._ACTIVE``), and the original otherwise. The fused training kernel
``mamba2_split_conv1d_scan_combined`` (mamba-ssm, GPU) would bypass both seams: while a patched mixer runs it
returns None, which makes the mixer take its unfused path (what it does without mamba-ssm).

Packed documents (``cu_seqlens`` from ``seqpar.models.shard_batch``): the conv history and the scan state reset
at every document start, on every rank, which is each document run alone (what mamba-ssm's ``seq_idx`` does;
transformers' PyTorch path has no packing). Under SP a cache (``use_cache=True``), a padding mask and any
keyword the seams do not implement (``seq_idx``, HF's varlen ``cu_seq_lens_*``) are refused in one line; on one
device with a cache or mask the model's own code runs (generation). ``position_ids`` reach the mixer through
the layers' keywords and are dropped: a Mamba2 mixer has no positions.
"""

from __future__ import annotations

import functools
import sys
from collections import Counter

import torch
import torch.nn.functional as F

from seqpar.comm import Group
from seqpar.kernels import acc_dtype
from seqpar.models import hybrid


def _scan_dispatcher(original):
    from seqpar.attention.ssd import ssd_scan

    @functools.wraps(original)
    def dispatch(hidden_states, dt, A, B, C, chunk_size, D=None, dt_bias=None, initial_states=None,
                 dt_softplus=False, dt_limit=(0.0, float("inf")), return_final_states=False, **kwargs):
        call = hybrid._ACTIVE.get()
        if call is None:
            return original(hidden_states, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias,
                            initial_states=initial_states, dt_softplus=dt_softplus, dt_limit=dt_limit,
                            return_final_states=return_final_states, **kwargs)
        if initial_states is not None or return_final_states:
            raise ValueError(f"{call.layer}: a recurrent state reached the Mamba2 scan under seqpar: train with "
                             "use_cache=False")
        hybrid._refuse_keywords(call, "mamba2_chunk_scan", kwargs)
        dt = dt.to(acc_dtype(hidden_states.dtype))  # Δ as transformers forms it (in float32, float64 kept)
        if dt_bias is not None:
            dt = dt + dt_bias.to(dt.dtype)
        if dt_softplus:
            dt = F.softplus(dt)
        dt = torch.clamp(dt, min=dt_limit[0], max=dt_limit[1])
        return ssd_scan(hidden_states, dt, A, B, C, D, group=call.group, cu_seqlens=call.cu_seqlens,
                        chunk_size=chunk_size)

    setattr(dispatch, hybrid._WRAPPED, True)
    return dispatch


def _fused_dispatcher(original):
    @functools.wraps(original)
    def dispatch(*args, **kwargs):
        return None if hybrid._ACTIVE.get() is not None else original(*args, **kwargs)

    setattr(dispatch, hybrid._WRAPPED, True)
    return dispatch


_FUNCTIONS = (("causal_conv1d_fn", hybrid._conv_dispatcher), ("mamba2_chunk_scan", _scan_dispatcher),
              ("mamba2_split_conv1d_scan_combined", _fused_dispatcher))


def install_ssd(layer: torch.nn.Module, group: Group, calls: Counter) -> None:
    """Patch one Mamba2 mixer (``hybrid.install`` calls it for the ``"ssd"`` seam)."""
    mod = sys.modules[type(layer).__module__]
    for name, make in _FUNCTIONS:
        fn = getattr(mod, name, None)
        if fn is None:
            raise ValueError(f"{type(layer).__name__}: transformers' {mod.__name__} has no {name}, the seam seqpar "
                             "patches: this transformers version is not supported for this family")
        if not getattr(fn, hybrid._WRAPPED, False):
            setattr(mod, name, make(fn))
    original = layer.forward
    name = type(layer).__name__

    @functools.wraps(original)
    def forward(hidden_states, cache=None, attention_mask=None, **kwargs):  # every Mamba2-style mixer's
        cu = kwargs.pop("cu_seqlens", None)
        if hybrid._refuse_unsharded(name, group, cache, attention_mask, kwargs):
            if cu is not None:
                raise ValueError(f"{name}: packed documents (cu_seqlens) with a cache or padding mask: pass one")
            return original(hidden_states, cache, attention_mask, **kwargs)
        kwargs.pop("position_ids", None)  # no positions in a Mamba2 mixer; the scan would refuse the keyword
        calls["ssd"] += 1
        token = hybrid._ACTIVE.set(hybrid._Call(group, cu, name))
        try:
            return original(hidden_states, cache, attention_mask, **kwargs)
        finally:
            hybrid._ACTIVE.reset(token)

    layer.forward, layer._seqpar_linear = forward, "ssd"
