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

Backends (``backend="auto"`` picks the first that supports the call):
  * ``"sdpa"``: PyTorch's fused flash kernel (CPU and CUDA) for unmasked or square-causal blocks; K/V heads
    are repeated for GQA inside this backend only.
  * ``"flash_attn"``: the flash-attn package's public ``flash_attn_func`` (CUDA, fp16/bf16, forward only;
    its backward goes through ``"sdpa"``), used only when installed.
  * ``"torch"``: tiled PyTorch (any device, any mask), memory O(block_size^2) per head, never O(Lq x Lk).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

BACKENDS = ("auto", "torch", "sdpa", "flash_attn")
DEFAULT_BLOCK = 512


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of partial results: float64 stays, everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class _Mask:
    """Visibility rule of one block: causal over positions and/or equal segment ids; None fields = off."""

    q_pos: torch.Tensor | None
    k_pos: torch.Tensor | None
    q_seg: torch.Tensor | None
    k_seg: torch.Tensor | None

    @property
    def empty(self) -> bool:
        return self.q_pos is None and self.q_seg is None

    def tile(self, qs: slice, ks: slice) -> torch.Tensor | bool:
        """Boolean [bq, bk] visibility of a tile; True = all visible, False = nothing visible."""
        if self.empty:
            return True
        vis = None
        if self.q_pos is not None:
            qp, kp = self.q_pos[qs], self.k_pos[ks]
            if int(kp.max()) <= int(qp.min()):
                vis = None if self.q_seg is not None else True
            elif int(kp.min()) > int(qp.max()):
                return False
            else:
                vis = kp[None, :] <= qp[:, None]
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
    if causal and q_pos is None:
        shift = Lk - Lq if causal == "bottom_right" else 0
        q_pos = torch.arange(Lq, device=device) + shift
        k_pos = torch.arange(Lk, device=device)
    return _Mask(q_pos, k_pos, q_seg, k_seg)


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


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()


def _fused_ok(q, k, causal, explicit_mask: bool, backend: str) -> bool:
    """Whether a fused kernel computes exactly this block: no explicit positions or segments, square if causal."""
    if explicit_mask or (causal and q.shape[1] != k.shape[1]):
        return False
    if backend == "flash_attn":
        return flash_attn_available() and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
    ops = _sdpa_ops(q.device)
    if ops is None:
        return False
    if q.is_cuda:  # CUDA flash kernel: half precision, head_dim multiple of 8 and <= 256
        return q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256
    return True


def _expand_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=2)


def _sdpa_forward(q, k, v, scale, causal: bool):
    fwd, _ = _sdpa_ops(q.device)
    g = q.shape[2] // k.shape[2]
    args = (q.transpose(1, 2), _expand_kv(k, g).transpose(1, 2), _expand_kv(v, g).transpose(1, 2))
    # The CUDA op takes an extra return_debug_mask flag.
    flags = (0.0, bool(causal), False) if q.is_cuda else (0.0, bool(causal))
    out, lse = fwd(*args, *flags, scale=scale)[:2]
    acc = acc_dtype(q.dtype)
    return out.transpose(1, 2).to(acc), lse.to(acc)


def _sdpa_backward(dout, q, k, v, out, lse, scale, causal: bool):
    _, bwd = _sdpa_ops(q.device)
    g = q.shape[2] // k.shape[2]
    qt = q.transpose(1, 2)
    kt, vt = _expand_kv(k, g).transpose(1, 2), _expand_kv(v, g).transpose(1, 2)
    dot = dout.to(q.dtype).transpose(1, 2)
    ot = out.to(q.dtype).transpose(1, 2)
    lse = lse.to(torch.float32) if q.dtype != torch.float64 else lse
    if q.is_cuda:
        # The CUDA flash backward also wants the rng state and cumulative lengths its forward returned.
        Lq, Lk = q.shape[1], k.shape[1]
        zero = torch.zeros((), dtype=torch.int64, device=q.device)
        dq, dk, dv = bwd(dot, qt, kt, vt, ot, lse.contiguous(), None, None, Lq, Lk, 0.0, bool(causal), zero, zero,
                         scale=scale)
    else:
        dq, dk, dv = bwd(dot, qt, kt, vt, ot, lse.contiguous(), 0.0, bool(causal), scale=scale)
    acc = acc_dtype(q.dtype)
    dk, dv = dk.transpose(1, 2), dv.transpose(1, 2)
    if g > 1:  # gradients of the repeated heads go back to their kv head
        B, Lk, H, D = dk.shape
        dk = dk.reshape(B, Lk, H // g, g, D).sum(3)
        dv = dv.reshape(B, Lk, H // g, g, D).sum(3)
    return dq.transpose(1, 2).to(acc), dk.to(acc), dv.to(acc)


def _flash_attn_forward(q, k, v, scale, causal: bool):
    from flash_attn import flash_attn_func

    out, lse, _ = flash_attn_func(q, k, v, softmax_scale=scale, causal=bool(causal), return_attn_probs=True)
    acc = acc_dtype(q.dtype)
    return out.to(acc), lse.to(acc)


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q [B, Lq, H, D]`` over ``k, v [B, Lk, Hkv, D]``: ``(out [B, Lq, H, D], lse [B, H, Lq])``.

    Not differentiable by itself: primitives call it inside their autograd Functions and use
    ``block_attention_backward`` with the merged ``(out, lse)``.
    """
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    mask = _make_mask(q.shape[1], k.shape[1], causal, q_pos, k_pos, q_seg, k_seg, q.device)
    _split_heads(q, k, v)  # validates shapes for every backend
    # Explicit positions or segments are a mask the fused kernels cannot express, even on square blocks.
    name = _choose(q, k, causal, q_pos is not None or q_seg is not None, backend)
    if name == "flash_attn":
        return _flash_attn_forward(q, k, v, scale, causal)
    if name == "sdpa":
        return _sdpa_forward(q, k, v, scale, bool(causal))
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv)`` of this block's contribution, given the *final* ``out``/``lse`` of the rows.

    When the rows' attention was merged from several blocks, passing the merged ``out`` and ``lse`` makes
    each block's gradients exact partial sums (FlashAttention-2 / ring attention backward).
    """
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    mask = _make_mask(q.shape[1], k.shape[1], causal, q_pos, k_pos, q_seg, k_seg, q.device)
    explicit = q_pos is not None or q_seg is not None
    name = _choose(q, k, causal, explicit, backend)
    if name in ("sdpa", "flash_attn") and _fused_ok(q, k, causal, explicit, "sdpa"):
        return _sdpa_backward(dout, q, k, v, out, lse, scale, bool(causal))
    return _torch_backward(dout, q, k, v, out, lse, scale, mask, block_size)


def available_backends(device: torch.device | str = "cpu") -> dict[str, bool]:
    """Which kernel backends can run on ``device`` here (for ``seqpar env``)."""
    device = torch.device(device)
    return {
        "torch": True,
        "sdpa": _sdpa_ops(device) is not None,
        "flash_attn": importlib.util.find_spec("flash_attn") is not None and device.type == "cuda",
    }
