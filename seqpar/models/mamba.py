"""The ``"selective"`` seam: Mamba (v1) mixers (``MambaMixer``; Falcon-Mamba's ``FalconMambaMixer``, the same
with RMS norms on B, C and Δ) run sequence-parallel in place, installed by ``patch_model`` through the family
table (``Family.linear``) and ``seqpar.models.hybrid.install``.

Seam: the mixer's forward (the model's own: ``in_proj``, ``x_proj``, ``dt_proj``, Falcon-Mamba's norms,
``out_proj``) calls two functions of its modeling module that carry everything sequence-mixing in it,
transformers' pure-PyTorch paths of the causal-conv1d and mamba-ssm kernels:

* ``causal_conv1d_forward(conv1d, x [B, D, n], cache, layer_idx, activation)``, the depthwise conv over x: run by
  ``seqpar.attention.short_conv.causal_conv1d`` (halo of the previous rank's K-1 inputs; the dispatcher is
  ``seqpar.models.hybrid``'s, shared with Kimi Linear);
* ``mamba_scan_forward(mixer, x [B, D, n], time_step [B, D, n], B [B, n, N], C [B, n, N], gate [B, D, n],
  cache)``, the selective scan and its gate: Δ = softplus(time_step + ``dt_proj.bias``), A = -exp(``A_log``)
  are formed as transformers does, in the accumulation dtype (float32; float64 in a float64 model, where
  transformers rounds A, D and Δ's bias to float32), the scan runs by
  ``seqpar.attention.selective_scan.selective_scan`` (one all-gather of per-rank elementwise affine maps), and
  its output is gated by SiLU(gate), as transformers' ``mamba_selective_scan`` does.

These are narrower than the mixer's forward (which stays the model's: a new projection or norm in transformers
is run, not copied). Each module function is wrapped once by a dispatcher that runs seqpar's primitive only
while a patched mixer's forward is running (``hybrid._ACTIVE``), and the original otherwise. The fused training
kernel ``mamba_inner_fn`` (mamba-ssm, GPU; Mamba only) would bypass both: while a patched mixer runs it returns
None, which makes the mixer take its unfused path (what it does without mamba-ssm).

Packed documents (``cu_seqlens`` from ``seqpar.models.shard_batch``): the conv history and the scan state reset at
every document start, on every rank, which is each document run alone. transformers' Mamba models drop unknown
keywords (``MambaForCausalLM`` calls its backbone, and the backbone its blocks, without them), so the forwards of
the modeling module's ``*ForCausalLM`` and ``*Model`` classes are wrapped once too: they pop ``cu_seqlens`` and
hand it to the patched mixers they hold, where it stays until that model's next forward (gradient
checkpointing's recomputation in the backward reads it there: run each forward's backward before the next
forward, as training does). Unpatched models ignore it, as before. Under SP a cache (``use_cache=True``), a
padding mask and any keyword the seams do not implement are refused in one line; on one device with a cache or
mask the model's own code runs (generation).
"""

from __future__ import annotations

import contextvars
import functools
import sys
import weakref
from collections import Counter

import torch
import torch.nn.functional as F

from seqpar.comm import Group
from seqpar.kernels import acc_dtype
from seqpar.models import hybrid
from seqpar.models.mamba2 import _fused_dispatcher

SEAM = "selective"
# the documents of each patched mixer's current forward, set by its model's forward (see the docstring)
_DOCS: weakref.WeakKeyDictionary[torch.nn.Module, torch.Tensor | None] = weakref.WeakKeyDictionary()
_IN_MODEL: contextvars.ContextVar[bool] = contextvars.ContextVar("seqpar_mamba_model", default=False)


def _scan_dispatcher(original):
    from seqpar.attention.selective_scan import selective_scan

    @functools.wraps(original)
    def dispatch(module, hidden_states, time_step, B, C, gate, cache=None, **kwargs):
        call = hybrid._ACTIVE.get()
        if call is None:
            return original(module, hidden_states, time_step, B, C, gate, cache, **kwargs)
        if cache is not None:
            raise ValueError(f"{call.layer}: a recurrent state reached the Mamba scan under seqpar: train with "
                             "use_cache=False")
        hybrid._refuse_keywords(call, "mamba_scan_forward", kwargs)
        acc = acc_dtype(hidden_states.dtype)
        A = -torch.exp(module.A_log.to(acc))
        dt = time_step.to(acc)
        if module.dt_proj.bias is not None:
            dt = dt + module.dt_proj.bias.to(acc)[:, None]
        y = selective_scan(hidden_states.transpose(1, 2), F.softplus(dt).transpose(1, 2), A, B, C, module.D,
                           group=call.group, cu_seqlens=call.cu_seqlens)
        return y.transpose(1, 2) * F.silu(gate)  # [B, D, n], as mamba_scan_forward returns it

    setattr(dispatch, hybrid._WRAPPED, True)
    return dispatch


def _model_dispatcher(original):
    """A ``*Model`` / ``*ForCausalLM`` forward that hands ``cu_seqlens`` to the patched mixers it holds (the
    outermost such forward of a call does; the backbone inside a causal LM is called without them)."""

    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        cu = kwargs.pop("cu_seqlens", None)
        if _IN_MODEL.get():
            return original(self, *args, **kwargs)
        for module in self.modules():
            if vars(module).get("_seqpar_linear") == SEAM:
                _DOCS[module] = cu  # None too: no documents of an earlier forward stay behind
        token = _IN_MODEL.set(True)
        try:
            return original(self, *args, **kwargs)
        finally:
            _IN_MODEL.reset(token)

    setattr(forward, hybrid._WRAPPED, True)
    return forward


# (name in the mixer's modeling module, dispatcher maker, required)
_FUNCTIONS = (("causal_conv1d_forward", hybrid._conv_forward_dispatcher, True),
              ("mamba_scan_forward", _scan_dispatcher, True), ("mamba_inner_fn", _fused_dispatcher, False))


def _wrap_once(owner, name: str, make, layer: str, where: str) -> None:
    fn = getattr(owner, name, None)
    if fn is None:
        raise ValueError(f"{layer}: transformers' {where} has no {name}, the seam seqpar patches: this transformers "
                         "version is not supported for this family")
    if not getattr(fn, hybrid._WRAPPED, False):
        setattr(owner, name, make(fn))


def install_selective(layer: torch.nn.Module, group: Group, calls: Counter) -> None:
    """Patch one Mamba (v1) mixer (``hybrid.install`` calls it for the ``"selective"`` seam)."""
    mod = sys.modules[type(layer).__module__]
    name = type(layer).__name__
    for fn, make, required in _FUNCTIONS:
        if required or hasattr(mod, fn):
            _wrap_once(mod, fn, make, name, mod.__name__)
    prefix = name.removesuffix("Mixer")  # MambaMixer -> MambaModel, MambaForCausalLM
    for cls in (f"{prefix}Model", f"{prefix}ForCausalLM"):
        _wrap_once(getattr(mod, cls, None), "forward", _model_dispatcher, name, f"{mod.__name__}.{cls}")
    original = layer.forward

    @functools.wraps(original)
    def forward(hidden_states, cache=None, attention_mask=None, **kwargs):  # MambaMixer.forward's
        cu = kwargs.pop("cu_seqlens", None)
        cu = _DOCS.get(layer) if cu is None else cu
        if hybrid._refuse_unsharded(name, group, cache, attention_mask, kwargs):
            if cu is not None:
                raise ValueError(f"{name}: packed documents (cu_seqlens) with a cache or padding mask: pass one")
            return original(hidden_states, cache, attention_mask, **kwargs)
        kwargs.pop("position_ids", None)  # no positions in a Mamba mixer; the seams would refuse the keyword
        calls[SEAM] += 1
        token = hybrid._ACTIVE.set(hybrid._Call(group, cu, name))
        try:
            return original(hidden_states, cache, attention_mask, **kwargs)
        finally:
            hybrid._ACTIVE.reset(token)

    _DOCS[layer] = None
    layer.forward, layer._seqpar_linear = forward, SEAM
