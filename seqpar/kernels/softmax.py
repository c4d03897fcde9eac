"""Block softmax attention of a query block against a key/value block, returning ``(out, lse)``, and its
backward from the saved ``lse`` (FlashAttention-2's recomputation, Dao 2023).

Every softmax sequence-parallel primitive reduces to calls of these two functions plus the log-sum-exp merge
in ``kernels/merge.py``:

    S = scale * Q K^T (masked),  lse = logsumexp_rows(S),  out = exp(S - lse) V
    backward, with delta = rowsum(dO ∘ O) of the *final* merged output:
    P = exp(S - lse),  dV = P^T dO,  dS = P ∘ (dO V^T - delta),  dQ = scale dS K,  dK = scale dS^T Q

Shapes: ``q [B, Lq, H, D]``, ``k, v [B, Lk, Hkv, D]`` with Hkv dividing H (GQA: q head h reads kv head
h // (H/Hkv), as transformers' ``repeat_kv``); ``out [B, Lq, H, D]`` and ``lse [B, H, Lq]`` in float32
(float64 for float64 inputs); gradients in the same accumulation dtype.

Masks: ``causal`` False (none), True or ``"top_left"`` (query i sees keys j <= i, as SDPA's is_causal), or
``"bottom_right"`` (query i sees keys j <= i + Lk - Lq, as flash-attn). Explicit global ``q_pos``/``k_pos``
(int ``[Lq]``/``[Lk]``) make causal mean ``k_pos <= q_pos`` (zigzag shards); ``q_seg``/``k_seg`` (document
ids) forbid attention across documents (packed varlen sequences). Rows that see no key return out = 0 and
lse = -inf.

Host-side masks (what the primitives pass; see ``kernels/plan.py``): ``q_spans``/``k_spans`` (contiguous runs
``(start, stop)`` of global positions in local order, Python ints), ``cu_seqlens`` (Python-int document
boundaries) and ``window`` (a sliding window, transformers' ``q - w < k <= q``), or a ready ``plan``. The
block is then cut into full rectangles, square causal diagonals and (windows) anti-diagonal squares, each
computed by a fused kernel and merged by log-sum-exp; pieces sharing no document are skipped. Rectangular causal
blocks (``Lq != Lk``, either alignment) take the same route. The tensor masks above have no fused
kernel: they run the tiled kernel.

Backends (``backend="auto"`` picks the first that supports the call):
  * ``"sdpa"``: PyTorch's fused kernels for unmasked or square-causal blocks: the flash kernel on CPU (any
    float dtype) and on CUDA (fp16/bf16, head_dim a multiple of 8 up to 256), the memory-efficient kernel on
    CUDA for float32 (head_dim a multiple of 4 up to 256; it returns the lse too). The flash kernels take GQA
    K/V as they are; for the memory-efficient one K/V heads are repeated once per block call.
  * ``"flash_attn"``: the flash-attn package's public ``flash_attn_func`` (CUDA, fp16/bf16, forward only;
    its backward goes through ``"sdpa"``), used only when installed. A packed block (a plan whose rows each
    see one key run, ``varlen_segments``) is one ``flash_attn_varlen_func`` call instead of one per piece.
  * ``"torch"``: tiled PyTorch (any device, any mask), memory O(block_size^2) per head, never O(Lq x Lk);
    the reference, and the fallback for what no fused kernel computes (tensor masks, an unsupported dtype or
    head_dim). Every fallback under ``backend="auto"`` is counted (``fallback_counts()``) and warned about
    once per process and reason.

On CPU, bfloat16/float16 blocks are computed in float32 (upcast once per block: half-precision matmuls are
emulated on CPU and several times slower); outputs and gradients are float32 accumulators either way.
"""

from __future__ import annotations

import collections
import functools
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from seqpar.kernels.host import is_fake
from seqpar.kernels.merge import merge_into
from seqpar.kernels.plan import ANTI, BlockPlan, aligned_plan, spans_plan

BACKENDS = ("auto", "torch", "sdpa", "flash_attn")
DEFAULT_BLOCK = 512


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of partial results: float64 stays, everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class _Mask:
    """Visibility rule of one block: causal over positions and/or equal segment ids; None fields = off.
    ``shift``: the positions are ``arange(Lq) + shift`` and ``arange(Lk)`` (a plain causal mask), so which
    tiles are wholly visible or hidden is known on the host."""

    q_pos: torch.Tensor | None
    k_pos: torch.Tensor | None
    q_seg: torch.Tensor | None
    k_seg: torch.Tensor | None
    shift: int | None = None

    @property
    def empty(self) -> bool:
        return self.q_pos is None and self.q_seg is None

    def _extent(self, qs: slice, ks: slice) -> tuple[int, int, int, int] | None:
        """(min, max) of the tile's query positions and key positions as host ints; None when only the device
        knows them (explicit position tensors off the CPU: reading them would sync every tile)."""
        if self.shift is not None:
            return qs.start + self.shift, qs.stop - 1 + self.shift, ks.start, ks.stop - 1
        if self.q_pos.device.type != "cpu":
            return None
        qp, kp = self.q_pos[qs], self.k_pos[ks]
        return int(qp.min()), int(qp.max()), int(kp.min()), int(kp.max())

    def tile(self, qs: slice, ks: slice) -> torch.Tensor | bool:
        """Boolean [bq, bk] visibility of a tile; True = all visible, False = nothing visible."""
        if self.empty:
            return True
        vis = None
        if self.q_pos is not None:
            extent = self._extent(qs, ks)
            if extent is not None and extent[3] <= extent[0]:
                vis = None if self.q_seg is not None else True
            elif extent is not None and extent[2] > extent[1]:
                return False
            else:
                vis = self.k_pos[ks][None, :] <= self.q_pos[qs][:, None]
            if vis is True:
                return True
        if self.q_seg is not None:
            same = self.q_seg[qs][:, None] == self.k_seg[ks][None, :]
            vis = same if vis is None else vis & same
        return vis


def _make_mask(Lq, Lk, causal, q_pos, k_pos, q_seg, k_seg, device) -> _Mask:
    if causal not in (False, True, "top_left", "bottom_right"):
        raise ValueError(f"causal={causal!r}: use False, True/'top_left' or 'bottom_right'")
    if (q_pos is None) != (k_pos is None) or (q_seg is None) != (k_seg is None):
        raise ValueError("q_pos/k_pos and q_seg/k_seg must be given in pairs")
    if q_pos is not None and causal is False:
        raise ValueError("q_pos/k_pos only define a causal mask: pass causal=True with them")
    shift = None
    if causal and q_pos is None:
        shift = Lk - Lq if causal == "bottom_right" else 0
        q_pos = torch.arange(Lq, device=device) + shift
        k_pos = torch.arange(Lk, device=device)
    return _Mask(q_pos, k_pos, q_seg, k_seg, shift)


def _split_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """[B, L, H, D] -> q [B, Hkv, g, Lq, D], k/v [B, Hkv, 1, Lk, D]: GQA by broadcasting, no repeat."""
    B, Lq, H, D = q.shape
    Hkv = k.shape[2]
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must be [B, Lk, Hkv, D] with B={B}, D={D}")
    if H % Hkv:
        raise ValueError(f"kv heads ({Hkv}) must divide query heads ({H}) for GQA")
    qh = q.view(B, Lq, Hkv, H // Hkv, D).permute(0, 2, 3, 1, 4)
    return qh, k.permute(0, 2, 1, 3).unsqueeze(2), v.permute(0, 2, 1, 3).unsqueeze(2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, Hkv, g, L, D] -> [B, L, H, D]."""
    B, Hkv, g, L, D = x.shape
    return x.permute(0, 3, 1, 2, 4).reshape(B, L, Hkv * g, D)


# ------------------------------------------------------------------------------------------ torch backend


def _torch_forward(q, k, v, scale, mask: _Mask, block: int):
    acc = acc_dtype(q.dtype)
    qh, kh, vh = _split_heads(q, k, v)
    B, Hkv, g, Lq, D = qh.shape
    Lk = kh.shape[3]
    out = qh.new_zeros((B, Hkv, g, Lq, D), dtype=acc)
    lse = qh.new_full((B, Hkv, g, Lq), float("-inf"), dtype=acc)
    for q0 in range(0, Lq, block):
        qs = slice(q0, min(q0 + block, Lq))
        qt = qh[:, :, :, qs].to(acc) * scale
        m = qt.new_full(qt.shape[:-1], float("-inf"))
        l = qt.new_zeros(qt.shape[:-1])
        o = torch.zeros_like(qt)
        for k0 in range(0, Lk, block):
            ks = slice(k0, min(k0 + block, Lk))
            vis = mask.tile(qs, ks)
            if vis is False:
                continue
            s = qt @ kh[:, :, :, ks].to(acc).transpose(-1, -2)
            if vis is not True:
                s = s.masked_fill(~vis, float("-inf"))
            m_new = torch.maximum(m, s.amax(-1))
            m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
            p = torch.exp(s - m_safe.unsqueeze(-1))
            alpha = torch.exp(m - m_safe)
            l = l * alpha + p.sum(-1)
            o = o * alpha.unsqueeze(-1) + p @ vh[:, :, :, ks].to(acc)
            m = m_new
        seen = l > 0
        out[:, :, :, qs] = torch.where(seen.unsqueeze(-1), o / l.clamp_min(1e-300).unsqueeze(-1), 0.0)
        lse[:, :, :, qs] = torch.where(seen, m + torch.log(l.clamp_min(1e-300)), float("-inf"))
    return _merge_heads(out), lse.reshape(B, Hkv * g, Lq)


def _torch_backward(dout, q, k, v, out, lse, scale, mask: _Mask, block: int):
    acc = acc_dtype(q.dtype)
    qh, kh, vh = _split_heads(q, k, v)
    B, Hkv, g, Lq, D = qh.shape
    Lk = kh.shape[3]
    doh = dout.to(acc).view(B, Lq, Hkv, g, D).permute(0, 2, 3, 1, 4)
    delta = (dout.to(acc) * out.to(acc)).sum(-1).view(B, Lq, Hkv, g).permute(0, 2, 3, 1)
    lse = lse.to(acc).view(B, Hkv, g, Lq)
    lse = torch.where(torch.isinf(lse), torch.full_like(lse, float("inf")), lse)  # empty rows: P = 0
    dq = torch.zeros_like(qh, dtype=acc)
    dk = kh.new_zeros((B, Hkv, Lk, D), dtype=acc)
    dv = torch.zeros_like(dk)
    for q0 in range(0, Lq, block):
        qs = slice(q0, min(q0 + block, Lq))
        qt, dot = qh[:, :, :, qs].to(acc), doh[:, :, :, qs]
        for k0 in range(0, Lk, block):
            ks = slice(k0, min(k0 + block, Lk))
            vis = mask.tile(qs, ks)
            if vis is False:
                continue
            kt, vt = kh[:, :, :, ks].to(acc), vh[:, :, :, ks].to(acc)
            s = (qt @ kt.transpose(-1, -2)) * scale
            if vis is not True:
                s = s.masked_fill(~vis, float("-inf"))
            p = torch.exp(s - lse[:, :, :, qs].unsqueeze(-1))
            dv[:, :, ks] += (p.transpose(-1, -2) @ dot).sum(2)
            ds = p * (dot @ vt.transpose(-1, -2) - delta[:, :, :, qs].unsqueeze(-1))
            dq[:, :, :, qs] += (ds @ kt) * scale
            dk[:, :, ks] += (ds.transpose(-1, -2) @ qt).sum(2) * scale
    return _merge_heads(dq), dk.transpose(1, 2), dv.transpose(1, 2)


# ------------------------------------------------------------------------------------------ fused backends


def _sdpa_ops(device: torch.device):
    aten = torch.ops.aten
    if device.type == "cpu" and hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        return (
            aten._scaled_dot_product_flash_attention_for_cpu,
            aten._scaled_dot_product_flash_attention_for_cpu_backward,
        )
    if device.type == "cuda" and hasattr(aten, "_scaled_dot_product_flash_attention"):
        return aten._scaled_dot_product_flash_attention, aten._scaled_dot_product_flash_attention_backward
    return None


_FALLBACKS: collections.Counter = collections.Counter()
_WARNED: set[str] = set()


def fallback_counts() -> dict[str, int]:
    """How many blocks ran the tiled kernel under ``backend="auto"`` since the last reset, by reason."""
    return dict(_FALLBACKS)


def reset_fallbacks() -> None:
    """Zero the counter, and warn again on the next fallback of each reason."""
    _FALLBACKS.clear()
    _WARNED.clear()


def _fallback(reason: str) -> None:
    _FALLBACKS[reason] += 1
    if reason not in _WARNED:
        _WARNED.add(reason)
        warnings.warn(f"seqpar attention runs the tiled PyTorch kernel (slow): {reason}", stacklevel=4)


@functools.lru_cache(maxsize=1)
def _flash_attn_module():
    """flash-attn's module if it imports (a broken install warns once and is never used), else None."""
    if not torch.cuda.is_available():
        return None
    try:
        import flash_attn
    except ImportError:
        return None
    except Exception as e:  # a binary built for another torch/CUDA: fall back to PyTorch's flash op
        warnings.warn(f"flash-attn is installed but does not import ({type(e).__name__}: {e}); using PyTorch's "
                      "flash kernel instead", stacklevel=2)
        return None
    return flash_attn


def flash_attn_available(device: torch.device | None = None) -> bool:
    """flash-attn imports and the GPU is Ampere or newer (FlashAttention-2's requirement)."""
    if _flash_attn_module() is None:
        return False
    return torch.cuda.get_device_capability(device) >= (8, 0)


def _fused_ok(q, k, causal, explicit_mask: bool, backend: str) -> bool:
    """Whether a fused kernel computes exactly this block: no explicit positions or segments, square if causal."""
    if explicit_mask or (causal and q.shape[1] != k.shape[1]):
        return False
    if backend == "flash_attn":
        return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256
                and flash_attn_available(q.device))
    return _sdpa_kernel(q) is not None


def _sdpa_kernel(q: torch.Tensor) -> str | None:
    """PyTorch's fused kernel for this block: ``"flash"`` (CPU any float dtype; CUDA half precision, head_dim a
    multiple of 8 up to 256), ``"efficient"`` (CUDA float32, head_dim a multiple of 4 up to 256: the
    memory-efficient kernel, which also returns the lse), or None (the tiled kernel)."""
    if _sdpa_ops(q.device) is None:
        return None
    if not q.is_cuda:
        return "flash"
    D = q.shape[-1]
    if q.dtype in (torch.float16, torch.bfloat16) and D % 8 == 0 and D <= 256:
        return "flash"
    if q.dtype == torch.float32 and D % 4 == 0 and D <= 256:
        return "efficient"
    return None


def _expand_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=2)


def _sdpa_kv_groups(q: torch.Tensor, k: torch.Tensor) -> int:
    """Query heads per kv head that the SDPA op needs repeated. 1 for the flash kernels, CPU and CUDA, which take
    GQA K/V as they are (forward and backward; dK/dV come back per kv head), so no ``[B, L, H, D]`` copies of K,
    V and their gradients exist (issue 14: they were the peak of a long-sequence step's attention backward).
    The CUDA memory-efficient kernel (float32) needs equal head counts: K/V are repeated once per block call
    (``_plan_inputs``: every piece of the block slices the one copy)."""
    return q.shape[2] // k.shape[2] if _sdpa_kernel(q) == "efficient" else 1


def _cpu_compute(*xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """CPU half precision -> float32 (emulated half matmuls are slow); anything else unchanged."""
    if xs[0].device.type == "cpu" and xs[0].dtype in (torch.float16, torch.bfloat16):
        return tuple(x.float() for x in xs)
    return xs


def _efficient_lse_rows(Lq: int) -> int:
    """Rows of the CUDA memory-efficient kernel's lse: the query length rounded up to a multiple of 32."""
    return -(-Lq // 32) * 32


def _sdpa_forward(q, k, v, scale, causal: bool):
    acc = acc_dtype(q.dtype)
    q, k, v = _cpu_compute(q, k, v)
    g = _sdpa_kv_groups(q, k)
    args = (q.transpose(1, 2), _expand_kv(k, g).transpose(1, 2), _expand_kv(v, g).transpose(1, 2))
    if _sdpa_kernel(q) == "efficient":  # (out, lse [B, H, ceil32(Lq)], seed, offset)
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            *args, None, True, 0.0, bool(causal), scale=scale)[:2]
        return out.transpose(1, 2).to(acc), lse[..., : q.shape[1]].to(acc)
    fwd, _ = _sdpa_ops(q.device)
    # The CUDA op takes an extra return_debug_mask flag.
    flags = (0.0, bool(causal), False) if q.is_cuda else (0.0, bool(causal))
    out, lse = fwd(*args, *flags, scale=scale)[:2]
    return out.transpose(1, 2).to(acc), lse.to(acc)


def _sdpa_backward(dout, q, k, v, out, lse, scale, causal: bool):
    acc = acc_dtype(q.dtype)
    q, k, v = _cpu_compute(q, k, v)
    g = _sdpa_kv_groups(q, k)
    qt = q.transpose(1, 2)
    kt, vt = _expand_kv(k, g).transpose(1, 2), _expand_kv(v, g).transpose(1, 2)
    dot = dout.to(q.dtype).transpose(1, 2)
    ot = out.to(q.dtype).transpose(1, 2)
    lse = lse.to(torch.float32) if q.dtype != torch.float64 else lse
    kernel = _sdpa_kernel(q)
    if kernel == "efficient":
        # the lse in the layout the forward returns (rows padded to 32); no dropout: the seed is never read
        Lq = q.shape[1]
        lse = F.pad(lse, (0, _efficient_lse_rows(Lq) - Lq)).contiguous()
        seed = torch.zeros((), dtype=torch.int64)
        dq, dk, dv = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            dot, qt, kt, vt, None, ot, lse, seed, seed, 0.0, [True, True, True, False], bool(causal),
            scale=scale)[:3]
    elif q.is_cuda:
        # The CUDA flash backward also wants the rng state and cumulative lengths its forward returned.
        _, bwd = _sdpa_ops(q.device)
        Lq, Lk = q.shape[1], k.shape[1]
        zero = torch.zeros((), dtype=torch.int64, device=q.device)
        dq, dk, dv = bwd(dot, qt, kt, vt, ot, lse.contiguous(), None, None, Lq, Lk, 0.0, bool(causal), zero, zero,
                         scale=scale)
    else:
        _, bwd = _sdpa_ops(q.device)
        dq, dk, dv = bwd(dot, qt, kt, vt, ot, lse.contiguous(), 0.0, bool(causal), scale=scale)
    dk, dv = dk.transpose(1, 2), dv.transpose(1, 2)
    if g > 1:  # gradients of the repeated heads go back to their kv head
        B, Lk, H, D = dk.shape
        dk = dk.reshape(B, Lk, H // g, g, D).sum(3)
        dv = dv.reshape(B, Lk, H // g, g, D).sum(3)
    return dq.transpose(1, 2).to(acc), dk.to(acc), dv.to(acc)


def _flash_attn_forward(q, k, v, scale, causal: bool):
    out, lse, _ = _flash_attn_module().flash_attn_func(q, k, v, softmax_scale=scale, causal=bool(causal),
                                                       return_attn_probs=True)
    acc = acc_dtype(q.dtype)
    # flash-attn gives rows that see no key lse = +inf; ours are -inf (out is 0 either way).
    lse = lse[..., : q.shape[1]].to(acc)
    return out.to(acc), lse.masked_fill(lse == float("inf"), float("-inf"))


@functools.lru_cache(maxsize=256)
def varlen_segments(plan: BlockPlan) -> tuple[bool, tuple[tuple[int, int, int, int], ...]] | None:
    """The plan as one ``flash_attn_varlen_func`` call: ``(causal, segments)``, each ``(q0, q1, k0, k1)`` a run of
    rows attending a run of keys (bottom-right causal when ``causal``), rows and keys consecutive and together
    covering the block; None when the plan is not of that form (then it runs piece by piece).

    Rows see one key run each: a full rectangle, a square causal diagonal, or a rectangle of earlier keys
    followed by the diagonal (a document's rows in a causal block: exactly flash-attn's bottom-right mask).
    Rows no piece covers get no keys (flash-attn returns 0 and lse = +inf), keys no row sees a segment of no
    rows. One call computes full rectangles (causal=False) or causal segments, not both (a one-row rectangle
    is either).
    """
    if any(p[4] == ANTI for p in plan.pieces):
        return None
    groups: dict[tuple[int, int], list] = {}
    for q0, q1, k0, k1, kind in plan.pieces:
        groups.setdefault((q0, q1), []).append((k0, k1, kind))
    runs, kinds = [], set()
    for (q0, q1), pieces in sorted(groups.items()):
        pieces.sort()
        if len(pieces) == 1 and pieces[0][2] is False:
            if q1 - q0 > 1:  # one row sees all its keys under either mask (a one-token document)
                kinds.add(False)
            runs.append((q0, q1, pieces[0][0], pieces[0][1]))
            continue
        *before, (d0, d1, kind) = pieces
        if kind is not True or d1 - d0 != q1 - q0 or len(before) > 1 or any(b[2] is not False or b[1] != d0
                                                                               for b in before):
            return None
        kinds.add(True)
        runs.append((q0, q1, before[0][0] if before else d0, d1))
    if len(kinds) > 1:
        return None
    segments, q_at, k_at = [], 0, 0
    for q0, q1, k0, k1 in runs:
        if q0 < q_at or k0 < k_at:  # overlapping row or key runs: not one varlen call
            return None
        if q0 > q_at:
            segments.append((q_at, q0, k_at, k_at))  # rows that see nothing
        if k0 > k_at:
            segments.append((q0, q0, k_at, k0))  # keys nobody here sees
        segments.append((q0, q1, k0, k1))
        q_at, k_at = q1, k1
    if q_at < plan.lq:
        segments.append((q_at, plan.lq, k_at, k_at))
    if k_at < plan.lk:
        segments.append((plan.lq, plan.lq, k_at, plan.lk))
    return bool(kinds and kinds.pop()), tuple(segments)


def _flash_varlen_forward(q, k, v, scale, causal: bool, segments) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole packed block in one ``flash_attn_varlen_func`` call (``varlen_segments``): flash-attn's layout is
    ``[total, H, D]`` with int32 cumulative lengths on the device, its lse ``[H, total]`` float32, +inf for
    rows that see no key (ours: -inf). The batch rows become consecutive sequences. K/V keep their kv heads."""
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    max_q = max(q1 - q0 for q0, q1, _, _ in segments)
    max_k = max(k1 - k0 for _, _, k0, k1 in segments)
    out, lse, _ = _flash_attn_module().flash_attn_varlen_func(
        q.reshape(B * Lq, H, D), k.reshape(B * Lk, k.shape[2], D), v.reshape(B * Lk, v.shape[2], D),
        *_varlen_cu(segments, B, Lq, Lk, q.device), max_q, max_k, softmax_scale=scale, causal=causal,
        return_attn_probs=True)
    acc = acc_dtype(q.dtype)
    lse = lse.to(acc).view(H, B, Lq).permute(1, 0, 2)
    return out.view(B, Lq, H, D).to(acc), lse.masked_fill(lse == float("inf"), float("-inf"))


_CU: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _varlen_cu(segments, B: int, Lq: int, Lk: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """int32 ``(cu_seqlens_q, cu_seqlens_k)`` of the segments on ``device``, copied there once per plan and shape
    (every layer and step reuses them: a copy of host data to the GPU waits for the stream)."""
    key = (segments, B, Lq, Lk, device)
    if key not in _CU:
        cu_q = [b * Lq + q0 for b in range(B) for q0, _, _, _ in segments] + [B * Lq]
        cu_k = [b * Lk + k0 for b in range(B) for _, _, k0, _ in segments] + [B * Lk]
        cu = tuple(torch.tensor(c, dtype=torch.int32, device=device) for c in (cu_q, cu_k))
        if is_fake(cu[0]):  # fake tensors belong to their FakeTensorMode: never kept
            return cu
        if len(_CU) >= 256:
            _CU.clear()
        _CU[key] = cu
    return _CU[key]


# ------------------------------------------------------------------------------------------ plans


def _plan_inputs(q, k, v, name: str):
    """Once per block: CPU half -> float32, and for the SDPA op K/V repeated to the query heads (pieces then
    slice them instead of repeating per piece)."""
    if name == "torch":
        return q, k, v, 1
    q, k, v = _cpu_compute(q, k, v)
    g = _sdpa_kv_groups(q, k) if name == "sdpa" else 1
    return q, _expand_kv(k, g), _expand_kv(v, g), g


def _piece_forward(name: str, q, k, v, scale, causal: bool, block: int):
    if name == "flash_attn":
        return _flash_attn_forward(q, k, v, scale, causal)
    if name == "sdpa":
        return _sdpa_forward(q, k, v, scale, causal)
    return _torch_forward(q, k, v, scale, _make_mask(q.shape[1], k.shape[1], causal, None, None, None, None,
                                                      q.device), block)


def _flip(*xs: torch.Tensor, dim: int = 1) -> tuple[torch.Tensor, ...]:
    """Reverse the sequence axis: an anti-diagonal square (row i sees keys j >= i) becomes a causal one."""
    return tuple(x.flip(dim) for x in xs)


def _plan_forward(q, k, v, scale, plan: BlockPlan, name: str, block: int):
    acc = acc_dtype(q.dtype)
    B, Lq, H, D = q.shape
    single = len(plan.pieces) == 1 and plan.pieces[0][:2] == (0, Lq)
    if name == "flash_attn" and not single and plan.pieces and (varlen := varlen_segments(plan)) is not None:
        return _flash_varlen_forward(q, k, v, scale, *varlen)  # a packed block: one kernel call, no merges
    out = None if single else q.new_zeros((B, Lq, H, D), dtype=acc)
    lse = None if single else q.new_full((B, H, Lq), float("-inf"), dtype=acc)
    qc, kc, vc, _ = _plan_inputs(q, k, v, name)
    for (q0, q1, k0, k1, kind), first in zip(plan.pieces, plan.first):
        if kind == ANTI:  # the window's far edge: the causal kernel on the reversed square
            o, l = _piece_forward(name, *_flip(qc[:, q0:q1], kc[:, k0:k1], vc[:, k0:k1]), scale, True, block)
            o, l = o.flip(1), l.flip(2)
        else:
            o, l = _piece_forward(name, qc[:, q0:q1], kc[:, k0:k1], vc[:, k0:k1], scale, kind, block)
        if single:  # one piece covers every row: its result is the block's (no zeroed accumulator)
            return o.to(acc), l.to(acc)
        if first:  # rows no earlier piece touched: store
            out[:, q0:q1], lse[:, :, q0:q1] = o, l
        else:
            merge_into(out[:, q0:q1], lse[:, :, q0:q1], o, l)
    return out, lse


def _plan_backward(dout, q, k, v, out, lse, scale, plan: BlockPlan, name: str, block: int):
    acc = acc_dtype(q.dtype)
    qc, kc, vc, g = _plan_inputs(q, k, v, name)
    whole = len(plan.pieces) == 1 and plan.pieces[0][:4] == (0, q.shape[1], 0, k.shape[1])
    if not whole:  # several pieces (or one not covering the block): accumulate; one covering piece is returned as is
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        dk = torch.zeros(kc.shape, dtype=acc, device=q.device)
        dv = torch.zeros(kc.shape, dtype=acc, device=q.device)
    for q0, q1, k0, k1, kind in plan.pieces:
        args = (dout[:, q0:q1], qc[:, q0:q1], kc[:, k0:k1], vc[:, k0:k1], out[:, q0:q1])
        anti = kind == ANTI
        args = (*_flip(*args), lse[:, :, q0:q1].flip(2)) if anti else (*args, lse[:, :, q0:q1])
        causal = True if anti else kind
        if name == "torch":
            mask = _make_mask(q1 - q0, k1 - k0, causal, None, None, None, None, q.device)
            gq, gk, gv = _torch_backward(*args, scale, mask, block)
        else:  # flash-attn's forward saves what PyTorch's flash backward reads (lse [B, H, L])
            gq, gk, gv = _sdpa_backward(*args, scale, causal)
        if anti:
            gq, gk, gv = _flip(gq, gk, gv)
        if whole:
            dq, dk, dv = gq.to(acc), gk.to(acc), gv.to(acc)
            break
        dq[:, q0:q1] += gq
        dk[:, k0:k1] += gk
        dv[:, k0:k1] += gv
    if g > 1:  # gradients of the repeated heads go back to their kv head
        B, Lk, H, D = dk.shape
        dk = dk.reshape(B, Lk, H // g, g, D).sum(3)
        dv = dv.reshape(B, Lk, H // g, g, D).sum(3)
    return dq, dk, dv


def _resolve_plan(q, k, causal, q_pos, q_seg, q_spans, k_spans, cu_seqlens, plan, window=None) -> BlockPlan | None:
    """The host-side plan of this call, or None for the plain fused path / tensor masks."""
    if causal not in (False, True, "top_left", "bottom_right"):
        raise ValueError(f"causal={causal!r}: use False, True/'top_left' or 'bottom_right'")
    if window is not None and plan is not None:
        raise ValueError("pass a window through spans_plan(..., window=) when giving a ready plan")
    hosted = q_spans is not None or k_spans is not None or cu_seqlens is not None or window is not None
    if (q_spans is None) != (k_spans is None):
        raise ValueError("q_spans and k_spans must be given together")
    if (plan is not None or hosted) and (q_pos is not None or q_seg is not None):
        raise ValueError("pass either host-side spans/cu_seqlens/plan or the tensors q_pos/k_pos/q_seg/k_seg, "
                         "not both")
    Lq, Lk = q.shape[1], k.shape[1]
    if plan is None and hosted:
        if q_spans is None:  # documents over the aligned positions
            shift = Lk - Lq if causal == "bottom_right" else 0
            q_spans, k_spans = [(shift, shift + Lq)], [(0, Lk)]
        plan = spans_plan(q_spans, k_spans, causal=bool(causal), cu_seqlens=cu_seqlens, window=window)
    if plan is None and q_pos is None and q_seg is None and causal and Lq != Lk:
        plan = aligned_plan(Lq, Lk, causal)  # rectangular causal: a full rectangle + a square diagonal
    if plan is not None and (plan.lq, plan.lk) != (Lq, Lk):
        raise ValueError(f"the plan/spans cover {plan.lq} queries x {plan.lk} keys but the block is {Lq} x {Lk}")
    return plan


# ------------------------------------------------------------------------------------------ public API


def _choose(q, k, causal, explicit_mask: bool, backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: use one of {BACKENDS}")
    if backend != "auto":
        if backend != "torch" and not _fused_ok(q, k, causal, explicit_mask, backend):
            raise ValueError(f"backend={backend!r} cannot compute this block (mask, dtype or device); use 'auto'")
        return backend
    for name in ("flash_attn", "sdpa"):
        if _fused_ok(q, k, causal, explicit_mask, name):
            return name
    return "torch"


def _pick(q, k, causal, explicit: bool, plan: BlockPlan | None, backend: str) -> str:
    """Kernel of this call; counts and warns about every fallback to the tiled kernel under "auto"."""
    if plan is not None:  # pieces are full rectangles and square (anti-)diagonals: what fused kernels compute
        name = _choose(q, k, False, False, backend)
        if name == "torch" and backend == "auto":
            _fallback(f"no fused kernel for {q.dtype} head_dim={q.shape[-1]} on {q.device.type}")
        return name
    name = _choose(q, k, causal, explicit, backend)
    if name == "torch" and backend == "auto":
        _fallback("tensor masks (q_pos/k_pos/q_seg/k_seg): pass host-side q_spans/k_spans/cu_seqlens instead"
                  if explicit else f"no fused kernel for {q.dtype} head_dim={q.shape[-1]} on {q.device.type}")
    return name


def block_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool | str = False,
    softmax_scale: float | None = None,
    q_pos: torch.Tensor | None = None,
    k_pos: torch.Tensor | None = None,
    q_seg: torch.Tensor | None = None,
    k_seg: torch.Tensor | None = None,
    backend: str = "auto",
    block_size: int = DEFAULT_BLOCK,
    q_spans: list[tuple[int, int]] | None = None,
    k_spans: list[tuple[int, int]] | None = None,
    cu_seqlens: list[int] | None = None,
    plan: BlockPlan | None = None,
    window: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q [B, Lq, H, D]`` over ``k, v [B, Lk, Hkv, D]``: ``(out [B, Lq, H, D], lse [B, H, Lq])``.

    Not differentiable by itself: primitives call it inside their autograd Functions and use
    ``block_attention_backward`` with the merged ``(out, lse)``.

    Host-side masks (fused kernels, see the module docstring):
        q_spans, k_spans: global positions of the rows/keys as contiguous runs ``[(start, stop), ...]`` in
            local order (Python ints); causal then means ``k_pos <= q_pos``.
        cu_seqlens: document boundaries ``[0, l1, ..., L]`` (Python ints) over those positions (over the
            aligned positions when no spans are given).
        plan: a ready ``kernels.plan.BlockPlan`` (e.g. ``prefix_plan`` for sinks) instead of spans.
        window: sliding window (causal only): a query at position p sees keys at positions ``p - window < k <= p``
            (transformers' ``sliding_window``); cut into full, causal and anti-diagonal fused pieces.
    """
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    _split_heads(q, k, v)  # validates shapes for every backend
    plan = _resolve_plan(q, k, causal, q_pos, q_seg, q_spans, k_spans, cu_seqlens, plan, window)
    # Explicit position/segment tensors are a mask the fused kernels cannot express, even on square blocks.
    name = _pick(q, k, causal, q_pos is not None or q_seg is not None, plan, backend)
    if plan is not None:
        return _plan_forward(q, k, v, scale, plan, name, block_size)
    if name == "flash_attn":
        return _flash_attn_forward(q, k, v, scale, causal)
    if name == "sdpa":
        return _sdpa_forward(q, k, v, scale, bool(causal))
    mask = _make_mask(q.shape[1], k.shape[1], causal, q_pos, k_pos, q_seg, k_seg, q.device)
    return _torch_forward(q, k, v, scale, mask, block_size)


def block_attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    causal: bool | str = False,
    softmax_scale: float | None = None,
    q_pos: torch.Tensor | None = None,
    k_pos: torch.Tensor | None = None,
    q_seg: torch.Tensor | None = None,
    k_seg: torch.Tensor | None = None,
    backend: str = "auto",
    block_size: int = DEFAULT_BLOCK,
    q_spans: list[tuple[int, int]] | None = None,
    k_spans: list[tuple[int, int]] | None = None,
    cu_seqlens: list[int] | None = None,
    plan: BlockPlan | None = None,
    window: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv)`` of this block's contribution, given the *final* ``out``/``lse`` of the rows.

    When the rows' attention was merged from several blocks, passing the merged ``out`` and ``lse`` makes
    each block's gradients exact partial sums (FlashAttention-2 / ring attention backward). Takes the same
    mask arguments as ``block_attention``.
    """
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    plan = _resolve_plan(q, k, causal, q_pos, q_seg, q_spans, k_spans, cu_seqlens, plan, window)
    explicit = q_pos is not None or q_seg is not None
    name = _pick(q, k, causal, explicit, plan, backend)
    fused_bwd = name in ("sdpa", "flash_attn") and _fused_ok(q, k, False if plan else causal, explicit, "sdpa")
    if plan is not None:
        return _plan_backward(dout, q, k, v, out, lse, scale, plan, "sdpa" if fused_bwd else "torch", block_size)
    if fused_bwd:
        return _sdpa_backward(dout, q, k, v, out, lse, scale, bool(causal))
    mask = _make_mask(q.shape[1], k.shape[1], causal, q_pos, k_pos, q_seg, k_seg, q.device)
    return _torch_backward(dout, q, k, v, out, lse, scale, mask, block_size)


def available_backends(device: torch.device | str = "cpu") -> dict[str, bool]:
    """Which kernel backends can run on ``device`` here (for ``seqpar env``)."""
    device = torch.device(device)
    return {
        "torch": True,
        "sdpa": _sdpa_ops(device) is not None,
        "flash_attn": device.type == "cuda" and flash_attn_available(device),
    }
