"""Input validation shared by the primitives (ring, RSA, Ulysses, USP, all-gather, S2, SF).

Every check runs before any K/V is exchanged and raises the same error on every rank: what differs between
ranks (shapes, dtypes, packed-document boundaries, options) is first compared across the group in ONE small
all-gather of int64 (``check_same_values``), so everything checked after that is identical on every rank and
a bad call can never leave one rank waiting in a collective. That all-gather is validation, not payload:
``ByteCounter`` does not count it.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.distributed as dist

from seqpar.comm import Group, _all_gather_flat, group_size
from seqpar.kernels.host import host_read
from seqpar.sharding import check_divisible, chunks_per_rank, host_bounds

_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
_CODES = (*_DTYPES, torch.int64, torch.int32, torch.bool)  # dtype codes compared across ranks


def _gather_ints(values: dict[str, list[int]], group: Group) -> dict[str, list[list[int]]]:
    """Every rank's ``values`` (one all-gather of int64, on the device nccl needs): name -> per-rank rows."""
    n, row = group_size(group), [x for v in values.values() for x in v]
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
    mine = torch.tensor(row, dtype=torch.int64, device=dev)
    everyone = torch.empty(n * len(row), dtype=torch.int64, device=dev)
    _all_gather_flat(everyone, mine, group=group)
    # The one deliberate read of a forward (a host sync on nccl); simulated, every rank has this rank's values.
    table = host_read(everyone.view(n, len(row)), "shape_check", lambda: [list(row)] * n, group=group)
    out, at = {}, 0
    for name, v in values.items():
        out[name], at = [r[at : at + len(v)] for r in table], at + len(v)
    return out


def check_same_values(group: Group, caller: str = "", **values: int) -> None:
    """Raise the same error on every rank if any named int differs across ``group`` (one collective)."""
    if group_size(group) == 1 or not values:
        return
    seen = _gather_ints({k: [int(v)] for k, v in values.items()}, group)
    differ = [f"{k} per rank = {[r[0] for r in rows]}" for k, rows in seen.items() if len({r[0] for r in rows}) > 1]
    if differ:
        raise ValueError(f"{caller + ': ' if caller else ''}the {group_size(group)} ranks of the SP group disagree: "
                         f"{', '.join(differ)}; every rank must pass its equal-length shard "
                         "(seqpar.sharding.shard) and the same options")


def _signature(t: torch.Tensor) -> list[int]:
    code = _CODES.index(t.dtype) if t.dtype in _CODES else -1
    return [t.dim(), *t.shape[:8], *([0] * (8 - min(t.dim(), 8))), code]


def _fingerprint(cu_seqlens) -> list[int]:
    """Length and a polynomial hash of the boundaries (-1 if they are not a tensor: refused after the check)."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.is_floating_point():
        return [-1, -1]
    h = 0
    for b in host_bounds(cu_seqlens):  # memoised on the tensor: no second device read in this forward
        h = (h * 1_000_003 + b) % (2**61 - 1)
    return [cu_seqlens.numel(), h]


def check_softmax_scale(softmax_scale: float | None) -> None:
    ok = isinstance(softmax_scale, (int, float)) and math.isfinite(softmax_scale) and softmax_scale > 0
    if softmax_scale is not None and not ok:
        raise ValueError(f"softmax_scale={softmax_scale!r} must be a positive finite float (None: head_dim ** -0.5)")


def check_head_split(heads: int, degree: int, *, what: str = "the group size N") -> None:
    """Ulysses' rule: the query heads split evenly over the ``degree`` ranks of the all-to-all (the registry's
    ``heads_split`` says which degree that is for each attention; the recipe validator checks it too)."""
    if heads % degree:
        valid = [n for n in range(1, heads + 1) if heads % n == 0]
        raise ValueError(
            f"Ulysses splits the heads over the ranks: heads={heads} is not divisible by {what}={degree}; "
            f"use a size that divides {heads} (valid: {valid}) or a model with more heads"
        )


def check_sinks(sinks, heads: int) -> None:
    """Learned sink logits: None, or a floating tensor of one value per query head (same on every rank)."""
    if sinks is None:
        return
    if not isinstance(sinks, torch.Tensor) or not sinks.is_floating_point() or sinks.shape != (heads,):
        got = tuple(sinks.shape) if isinstance(sinks, torch.Tensor) else type(sinks).__name__
        raise ValueError(f"sinks={got}: pass a floating tensor of shape ({heads},), one logit per query head")


def effective_window(window, seq_len: int, causal: object) -> int | None:
    """A sliding window (transformers' ``sliding_window``: query p sees keys ``p - window < k <= p``) as the
    kernels take it: None when absent or when it covers all ``seq_len`` keys (no effect), else the int."""
    if window is None:
        return None
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window={window!r} must be None or a positive int (tokens a query sees, itself included)")
    if window >= seq_len:
        return None
    if causal is False:
        raise ValueError(f"window={window} needs causal attention (a sliding window looks back only)")
    return window


def check_options(*, layout: str, causal: object, softmax_scale: float | None) -> None:
    """Arguments that are the same on every rank."""
    chunks_per_rank(layout)  # raises ShardingError naming the valid layouts
    if not isinstance(causal, bool):
        raise ValueError(f"causal={causal!r} must be True or False (sequence-parallel masks are global)")
    check_softmax_scale(softmax_scale)


def check_same_inputs(group: Group, cu_seqlens=None, **tensors: torch.Tensor) -> None:
    """Shapes and dtypes of ``tensors`` and the packed-document boundaries alike on every rank (one collective)."""
    n = group_size(group)
    if n == 1:
        return
    values = {name: _signature(t) for name, t in tensors.items()}
    if cu_seqlens is not None:
        values["cu_seqlens"] = _fingerprint(cu_seqlens)
    for name, rows in _gather_ints(values, group).items():
        if len({tuple(r) for r in rows}) == 1:
            continue
        if name == "cu_seqlens":
            raise ValueError(f"cu_seqlens differs across the {n} ranks of the SP group (count, hash per rank: "
                             f"{rows}): every rank must pass the global boundaries of the whole packed sequence")
        shown = sorted({f"{tuple(r[1 : 1 + r[0]])} {_CODES[r[9]] if r[9] >= 0 else '?'}" for r in rows})
        raise ValueError(f"{name} has different shapes or dtypes across the {n} ranks of the SP group: {shown}; "
                         "every rank must pass its equal-length shard (shard the sequence with seqpar.sharding.shard)")


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group: Group, layout: str,
              cu_seqlens=None, validate: bool = True) -> None:
    """``q [B, L/N, H, D]``, ``k, v [B, L/N, Hkv, D]`` (and ``cu_seqlens``) alike on every rank, Hkv dividing H,
    and a sequence length (local length x N) that ``layout`` can split. ``validate=False`` skips the
    cross-rank collective (a caller that already checked these shapes in this forward, e.g. every layer after
    the first)."""
    for t, name in ((q, "q"), (k, "k"), (v, "v")):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor [B, L/N, heads, D], got {type(t).__name__}")
    if validate:
        check_same_inputs(group, cu_seqlens, q=q, k=k, v=v)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must all be 4-D "
                         "[B, L/N, heads, D]: reshape [B, L, H*D] activations to [B, L, H, D]")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: batch, local length "
                         "and head_dim must match and k, v must have one shape (shard q, k and v alike)")
    heads, kv_heads = q.shape[2], k.shape[2]
    if heads % kv_heads:
        raise ValueError(f"kv heads={kv_heads}: k.shape[2]={kv_heads} must divide the query heads={heads} "
                         "(q.shape[2]) for GQA; use a kv head count that divides the head count")
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise ValueError(f"q, k, v dtypes {q.dtype}, {k.dtype}, {v.dtype} must be one floating dtype: "
                         "cast them to one")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v live on {q.device}, {k.device}, {v.device}: move them to one device")
    world = group_size(group)
    name = f"sequence length (q.shape[1]={q.shape[1]} x {world} ranks)"
    check_divisible(q.shape[1] * world, world, layout, name=name)


def tensor_fields(**tensors: torch.Tensor) -> dict[str, int]:
    """``{"q.dim": 4, "q.B": ..., "q.L": ..., "q.H": ..., "q.D": ..., "q.dtype": ...}`` for ``check_same_values``."""
    out = {}
    for name, t in tensors.items():
        dims = [*t.shape[:4], *([0] * (4 - min(t.dim(), 4)))]
        code = _DTYPES.index(t.dtype) if t.dtype in _DTYPES else -1
        out.update(zip([f"{name}.{f}" for f in ("dim", "B", "L", "H", "D", "dtype")], [t.dim(), *dims, code]))
    return out


def max_sink_tokens(local_len: int) -> int:
    """Most sink tokens SF-Attn takes: they all live on rank 0, so at most its ``local_len`` tokens (the recipe
    validator uses this too)."""
    return local_len


def check_shift_args(q, k, v, *, shift_size: int, num_sink_tokens: int, world: int, caller: str) -> None:
    """S2/SF (LongLoRA, SinkLoRA): ``[B, n, H, D]`` shards, even head counts (half the heads are shifted), a
    shift-group size G that is even and divides the local length n, and sink tokens that live on rank 0."""
    G, S = shift_size, num_sink_tokens
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{caller}: {name} must be [B, L_local, heads, head_dim], got shape {tuple(t.shape)}")
        if t.dtype not in _DTYPES or t.dtype != q.dtype:
            raise ValueError(f"{caller}: {name}.dtype={t.dtype}; q, k, v must share one of {_DTYPES}")
    B, n, H, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[1] != n or k.shape[3] != D:
        raise ValueError(f"{caller}: k {tuple(k.shape)} and v {tuple(v.shape)} must be "
                         f"[B={B}, L_local={n}, Hkv, D={D}] like q {tuple(q.shape)}")
    Hkv = k.shape[2]
    if H % 2 or Hkv % 2 or H % Hkv:
        raise ValueError(f"{caller}: H={H} query heads and Hkv={Hkv} kv heads: half the heads are shifted, so "
                         "both must be even and Hkv must divide H (use an even number of kv heads)")
    if G < 2 or G % 2 or n % G:
        valid = [g for g in range(2, n + 1, 2) if n % g == 0]
        raise ValueError(
            f"{caller}: group_size={G} must be even and divide the local sequence length {n} (L = {n * world} "
            f"over N = {world} ranks), so that unshifted groups stay on one rank; valid group_size values: "
            f"{valid} (or change L or N)"
        )
    if not 0 <= S <= max_sink_tokens(n):
        raise ValueError(f"{caller}: num_sink_tokens={S} must be in [0, {n}] (the local length: sink tokens "
                         "live on rank 0); use fewer sink tokens or longer shards")


_LINEAR_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_linear_args(q, k, v, *, decay, causal: bool, block_size: int) -> torch.Tensor:
    """Check ``q [B, L, H, Dk]``, ``k [B, L, Hkv, Dk]``, ``v [B, L, Hkv, Dv]``, ``decay``; return log λ [H].

    Every check is local and depends only on arguments all ranks share (dtypes, head counts, decay), so
    it raises on every rank alike; lengths, which may differ per rank, are checked collectively by the caller.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} has shape {tuple(t.shape)}: pass [batch, local_seq, heads, head_dim]")
        if t.dtype not in _LINEAR_DTYPES or t.dtype != q.dtype:
            raise ValueError(
                f"{name}.dtype={t.dtype} (q.dtype={q.dtype}): use one of {_LINEAR_DTYPES}, the same for q, k, v"
            )
    B, L, H, Dk = q.shape
    if k.shape[:2] != (B, L) or v.shape[:3] != k.shape[:3] or k.shape[3] != Dk or H % k.shape[2]:
        raise ValueError(
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: k and v must be [B, L, Hkv, D] "
            "with q's batch and length, k's head_dim equal to q's, and Hkv dividing the query heads"
        )
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size={block_size!r}: pass a positive int (tokens per intra-chunk block)")
    if not isinstance(causal, bool):
        raise ValueError(f"causal={causal!r}: pass True or False")
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32  # kernels' acc_dtype
    if decay is None:
        return torch.zeros(H, dtype=acc, device=q.device)
    if not causal:
        raise ValueError(
            f"decay={decay!r} with causal=False: decay λ^(t-s) is defined only for s <= t; pass decay=None "
            "(non-causal linear attention is Q · Σ_s k_s^T v_s) or causal=True"
        )
    bad = ValueError(f"decay={decay!r}: pass None, a float, or a tensor [{H}] (one per query head), values in (0, 1]")
    if not isinstance(decay, torch.Tensor):  # a number is checked on the host: no device read per call
        if not isinstance(decay, numbers.Real) or not 0 < float(decay) <= 1:  # numpy scalars too
            raise bad
        return torch.full((H,), float(decay), dtype=acc, device=q.device).log()  # a fill: no copy to the GPU
    # A tensor keeps its autograd graph (learned decay): log λ gets a gradient through ``decay_grad``.
    if decay.numel() not in (1, H) or decay.is_complex():
        raise bad
    if decay.device.type == "cpu":  # the range check reads the values: free on CPU, a host sync per layer on a GPU
        ok = ((decay.detach() > 0) & (decay.detach() <= 1)).all()
        if not host_read(ok, "decay_check", lambda: True):
            raise bad
    lam = decay.to(device=q.device, dtype=acc).flatten()
    return (lam.expand(H) if lam.numel() == 1 else lam).log()
