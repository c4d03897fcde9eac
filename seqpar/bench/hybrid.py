"""Bench methods of the ``hybrid`` suite: one Gated DeltaNet layer's rule, one Kimi Delta Attention rule (a
decay per key channel), one Mamba2 scan (SSD: H heads of P = head_dim, one group of B, C with N = d_state) and
one Lightning Attention layer, forward + backward, on one rank's shard.

* ``gdn_single`` / ``kda_single`` / ``ssd_single`` / ``lightning_single``: one process, the whole sequence
  (the baselines, N threads);
* ``gdn_lasp2`` / ``kda_lasp2`` / ``ssd_lasp2`` / ``lightning_lasp2``: seqpar's LASP-2
  (``seqpar.attention.gated_delta`` and ``seqpar.attention.ssd``, one all-gather of affine state maps;
  ``seqpar.attention.lasp2``, one all-gather of states);
* ``gdn_a2a`` / ``lightning_a2a``: the head all-to-all approach (PyTorch PR 197487, Megatron): an all-to-all
  gives each rank H/N heads of the whole sequence, the single-device kernel runs on them, an all-to-all
  returns the output (and the same twice in backward). Bytes grow with L; seqpar's do not.

Shapes: ``batch`` x ``seq_len`` x ``heads`` x ``head_dim`` (q, k, v of the same head count; g, beta per head
for the delta rule); float32.
"""

from __future__ import annotations

import torch

from seqpar.bench.methods import _fwd_bwd, method
from seqpar.comm import all_to_all, group_size
from seqpar.sharding import shard


def _inputs(cfg: dict, group, *, layout: str | None, gated: bool | str) -> list[torch.Tensor]:
    """The whole sequence's q, k, v (and g, beta) from one seed, each reduced to this rank's shard as soon as it
    is drawn: a rank holds its shard only, as in training. The shard is a copy: a contiguous shard of a batch-1
    tensor is a view that would keep the whole sequence's storage alive on every rank (it did, until 0.3: the
    N = 2 peaks of docs/hybrid.md's first L = 32k run counted the full inputs on each rank)."""
    g = torch.Generator().manual_seed(0)
    B, L, H, D = cfg["batch"], cfg["seq_len"], cfg["heads"], cfg["head_dim"]
    draws = [lambda: torch.randn(B, L, H, D, generator=g)] * 3
    if gated == "kda":  # a log decay per key channel
        draws += [lambda: -torch.rand(B, L, H, D, generator=g) * 0.1, lambda: torch.rand(B, L, H, generator=g)]
    elif gated == "ssd":  # x, Δ (after softplus), B, C of one group: Mamba2's scan inputs
        N = cfg.get("d_state", D)
        draws = [lambda: torch.randn(B, L, H, D, generator=g), lambda: torch.rand(B, L, H, generator=g) * 0.1,
                 lambda: torch.randn(B, L, 1, N, generator=g), lambda: torch.randn(B, L, 1, N, generator=g)]
    elif gated:
        draws += [lambda: -torch.rand(B, L, H, generator=g) * 0.1, lambda: torch.rand(B, L, H, generator=g)]
    ts = []
    for draw in draws:  # one whole-sequence tensor alive at a time
        t = draw()
        ts.append(t if layout is None else shard(t, group=group, layout=layout).clone())
        del t
    return [t.requires_grad_() for t in ts]


def _heads_a2a(fn, group):
    """Sequence-sharded inputs -> H/N heads of the whole sequence -> ``fn`` -> back to sequence shards."""

    def run(*ts):
        whole = [all_to_all(t.contiguous(), group=group, scatter_dim=2, gather_dim=1) for t in ts]
        return all_to_all(fn(*whole).contiguous(), group=group, scatter_dim=1, gather_dim=2)

    return run


def _gdn(group):
    from seqpar.attention.gated_delta import gated_delta_rule

    return lambda q, k, v, g, b: gated_delta_rule(q, k, v, g, b, group=group)


def _lightning(cfg, group, heads: int | None = None):
    """``heads``: the heads one call sees (H/N after the head all-to-all); one decay per head, as MiniMax's."""
    from seqpar.attention.lasp2 import lasp2_linear_attention

    decay = torch.full((heads or cfg["heads"],), cfg.get("decay", 0.99), dtype=torch.float64)
    return lambda q, k, v: lasp2_linear_attention(q, k, v, group=group, decay=decay)


@method("gdn_single")
def _gdn_single(cfg: dict, group):
    return _fwd_bwd(_gdn(None), _inputs(cfg, None, layout=None, gated=True), None)


@method("gdn_lasp2")
def _gdn_lasp2(cfg: dict, group):
    return _fwd_bwd(_gdn(group), _inputs(cfg, group, layout="contiguous", gated=True), "contiguous")


@method("gdn_a2a")
def _gdn_a2a(cfg: dict, group):
    if cfg["heads"] % group_size(group):
        raise ValueError(f"gdn_a2a: {cfg['heads']} heads do not split over {group_size(group)} ranks")
    fn = _heads_a2a(_gdn(None), group)
    return _fwd_bwd(fn, _inputs(cfg, group, layout="contiguous", gated=True), "contiguous")


@method("kda_single")
def _kda_single(cfg: dict, group):
    return _fwd_bwd(_gdn(None), _inputs(cfg, None, layout=None, gated="kda"), None)


@method("kda_lasp2")
def _kda_lasp2(cfg: dict, group):
    return _fwd_bwd(_gdn(group), _inputs(cfg, group, layout="contiguous", gated="kda"), "contiguous")


def _ssd(cfg: dict, group):
    from seqpar.attention.ssd import ssd_scan

    H = cfg["heads"]
    A = -torch.linspace(1.0, 16.0, H, dtype=torch.float32)  # -exp(A_log) as Mamba2 initialises A_log
    D = torch.ones(H)
    return lambda x, dt, B, C: ssd_scan(x, dt, A, B, C, D, group=group)


@method("ssd_single")
def _ssd_single(cfg: dict, group):
    return _fwd_bwd(_ssd(cfg, None), _inputs(cfg, None, layout=None, gated="ssd"), None)


@method("ssd_lasp2")
def _ssd_lasp2(cfg: dict, group):
    return _fwd_bwd(_ssd(cfg, group), _inputs(cfg, group, layout="contiguous", gated="ssd"), "contiguous")


@method("lightning_single")
def _lightning_single(cfg: dict, group):
    return _fwd_bwd(_lightning(cfg, None), _inputs(cfg, None, layout=None, gated=False), None)


@method("lightning_lasp2")
def _lightning_lasp2(cfg: dict, group):
    return _fwd_bwd(_lightning(cfg, group), _inputs(cfg, group, layout="contiguous", gated=False), "contiguous")


@method("lightning_a2a")
def _lightning_a2a(cfg: dict, group):
    if cfg["heads"] % group_size(group):
        raise ValueError(f"lightning_a2a: {cfg['heads']} heads do not split over {group_size(group)} ranks")
    fn = _heads_a2a(_lightning(cfg, None, cfg["heads"] // group_size(group)), group)
    return _fwd_bwd(fn, _inputs(cfg, group, layout="contiguous", gated=False), "contiguous")
