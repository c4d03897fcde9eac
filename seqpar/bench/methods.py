"""What each benchmarked method runs on one rank: inputs for its shard and one forward+backward step.

A method is a function ``build(cfg, group) -> step`` registered under a name; ``step()`` runs forward and
backward once and returns its output (detached; ``step.layout`` names how the sequence is sharded, so a
test can gather it and check the method against one process). Peers (DeepSpeed-Ulysses, PyTorch's
templated ring attention) are wrapped here so they run on the same inputs in the same harness as seqpar's
primitives. Model-level methods (a Llama training step) live in ``seqpar.bench.training``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from seqpar.attention.registry import ATTENTIONS
from seqpar.comm import group_rank, group_size
from seqpar.sharding import global_index

METHODS: dict[str, Callable] = {}


def method(name: str):
    def register(fn):
        METHODS[name] = fn
        return fn

    return register


def _qkv(cfg: dict, group, *, layout: str | None, requires_grad: bool = True):
    """Full-sequence inputs from a fixed seed, sharded for this rank (``layout=None``: the whole sequence).

    The sequence is drawn in runs of tokens and each rank keeps only its own (``global_index``, in increasing
    order in both layouts), so a rank never holds the whole q, k, v: the memory rows measure the call, not N
    copies of the inputs (issue 28). Every rank and the one-process baseline draw the same numbers."""
    g = torch.Generator().manual_seed(0)
    B, L, H, Hkv, D = cfg["batch"], cfg["seq_len"], cfg["heads"], cfg["kv_heads"], cfg["head_dim"]
    to = {"dtype": getattr(torch, cfg.get("dtype", "float32")), "device": cfg.get("device", "cpu")}
    mine = None if layout is None or group_size(group) == 1 else \
        global_index(L, group_size(group), group_rank(group), layout)
    run = max(1, L // 16)

    def draw(heads: int) -> torch.Tensor:
        parts = []
        for start in range(0, L, run):
            x = torch.randn(B, min(run, L - start), heads, D, generator=g)
            if mine is not None:
                x = x[:, mine[(mine >= start) & (mine < start + run)] - start]
            parts.append(x.to(**to))
        return torch.cat(parts, dim=1)

    return [t.requires_grad_(requires_grad) for t in (draw(H), draw(Hkv), draw(Hkv))]


def _fwd_bwd(fn: Callable, tensors: list[torch.Tensor], layout: str | None, *, heads_first: bool = False):
    """``step()``: forward + backward of ``fn(*tensors)`` with an all-ones output gradient made on the first
    call and kept (an input, like q, k, v); returns the output as ``[B, L_local, H, D]``."""

    def step() -> torch.Tensor:
        for t in tensors:
            t.grad = None
        out = fn(*tensors)
        if step.grad_out is None:  # the output gradient is an input like q, k, v (made once, kept)
            step.grad_out = torch.ones_like(out)
        out.backward(step.grad_out)
        return out.detach().transpose(1, 2) if heads_first else out.detach()

    step.grad_out = None

    step.layout, step.inputs, step.heads_first = layout, tensors, heads_first
    return step


@method("single_sdpa")
def _single_sdpa(cfg: dict, group):
    """One process, the whole sequence, PyTorch's fused SDPA (the best single-device CPU kernel)."""
    q, k, v = _qkv(cfg, None, layout=None)

    def attn(q, k, v):
        return F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=cfg["causal"], enable_gqa=True
        ).transpose(1, 2)

    return _fwd_bwd(attn, [q, k, v], None)


def packed_cu_seqlens(L: int, docs: str) -> torch.Tensor:
    """Document boundaries of a packed row: ``"eighths"`` = 8 documents of L/8; ``"mixed"`` = lengths 1/2,
    1/8, 1/4, 1/16, 1/16 of L (long and short documents, boundaries inside shards)."""
    lens = [L // 8] * 8 if docs == "eighths" else [L // 2, L // 8, L // 4, L // 16, L // 16]
    return torch.tensor([0, *itertools.accumulate(lens)])


def window_tokens(window: int | str, seq_len: int) -> int:
    """A bench window in tokens: an int is itself, ``"L/8"`` is an eighth of the sequence."""
    return seq_len // int(window.removeprefix("L/")) if isinstance(window, str) else window


def _seqpar(name: str, layout: str, *, docs: str | None = None, dtype: str | None = None,
            window: int | str | None = None, **extra):
    """A softmax primitive of the registry (``seqpar.attention.registry``) in one of its layouts; ``docs``:
    packed documents (``packed_cu_seqlens``); ``dtype`` overrides the suite's; ``window``: transformers'
    sliding window in tokens, or ``"L/8"`` (``window_tokens``)."""
    spec = ATTENTIONS[name]
    if layout not in spec.layouts:
        raise ValueError(f"bench method {name}/{layout}: the registry allows {spec.layouts}")
    if docs is not None and not spec.varlen:
        raise ValueError(f"bench method {name}: the registry says it takes no packed documents")
    if window is not None and "window" not in spec.options:
        raise ValueError(f"bench method {name}: the registry says it takes no window")

    def build(cfg: dict, group):
        fn = spec.load()
        if dtype is not None:
            cfg = {**cfg, "dtype": dtype}
        q, k, v = _qkv(cfg, group, layout=layout)
        kwargs = {"group": group, "causal": cfg["causal"], "layout": layout, **extra}
        if docs is not None:
            kwargs["cu_seqlens"] = packed_cu_seqlens(cfg["seq_len"], docs)
        if window is not None:
            kwargs["window"] = window_tokens(window, cfg["seq_len"])
        if spec.subgroups:
            from seqpar.attention.usp import usp_groups

            u = cfg.get("ulysses_degree", 2 if group_size(group) % 2 == 0 else 1)
            ug, rg = usp_groups(group, u)
            kwargs.update(ulysses_group=ug, ring_group=rg)
        return _fwd_bwd(lambda q, k, v: fn(q, k, v, **kwargs), [q, k, v], layout)

    return build


METHODS["ring_zigzag"] = _seqpar("ring", "zigzag")
METHODS["ring_contiguous"] = _seqpar("ring", "contiguous")
METHODS["rsa"] = _seqpar("rsa", "contiguous")
METHODS["ulysses"] = _seqpar("ulysses", "contiguous")
METHODS["usp"] = _seqpar("usp", "zigzag")
METHODS["allgather"] = _seqpar("allgather", "zigzag")
METHODS["ring_packed"] = _seqpar("ring", "zigzag", docs="eighths")
METHODS["ring_packed_mixed"] = _seqpar("ring", "zigzag", docs="mixed")
METHODS["allgather_packed"] = _seqpar("allgather", "zigzag", docs="eighths")
METHODS["ring_zigzag_bf16"] = _seqpar("ring", "zigzag", dtype="bfloat16")
METHODS["allgather_bf16"] = _seqpar("allgather", "zigzag", dtype="bfloat16")
# Issue 24: sliding windows (a halo exchange of the w - 1 keys before each run instead of a ring), each
# compared with the same call without a window (``seqpar.bench.suites.WINDOW_VERSUS``).
METHODS["ring_window_L8"] = _seqpar("ring", "zigzag", window="L/8")
METHODS["ring_window4096"] = _seqpar("ring", "zigzag", window=4096)
METHODS["ring_contiguous_window4096"] = _seqpar("ring", "contiguous", window=4096)


@method("deepspeed_ulysses")
def _deepspeed_ulysses(cfg: dict, group):
    """DeepSpeed-Ulysses (``deepspeed.sequence.layer.DistributedAttention``) around PyTorch SDPA."""
    import deepspeed
    from deepspeed.sequence.layer import DistributedAttention

    deepspeed.init_distributed(dist_backend="gloo")
    q, k, v = _qkv(cfg, group, layout="contiguous")
    if cfg["kv_heads"] != cfg["heads"]:  # DistributedAttention scatters q, k and v heads alike
        k, v = (t.detach().repeat_interleave(cfg["heads"] // cfg["kv_heads"], dim=2).requires_grad_() for t in (k, v))

    def local_attention(q, k, v, *args, **kwargs):
        return F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=cfg["causal"]
        ).transpose(1, 2)

    dist_attn = DistributedAttention(local_attention, group, scatter_idx=2, gather_idx=1)
    step = _fwd_bwd(lambda q, k, v: dist_attn(q, k, v, batch_dim_idx=0), [q, k, v], "contiguous")
    step.peer = True  # its traffic bypasses seqpar.comm, so the byte counter cannot see it
    return step


class _TorchRing(torch.autograd.Function):
    """PyTorch's own templated ring attention (the engine of ``context_parallel``) with the CPU flash op."""

    @staticmethod
    def forward(ctx, q, k, v, group, causal):
        from torch.distributed.tensor.experimental._attention import _templated_ring_attention

        aten = torch.ops.aten
        out, lse = _templated_ring_attention(
            group, 2, aten._scaled_dot_product_flash_attention_for_cpu, q, k, v, is_causal=causal
        )[:2]
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.causal = group, causal
        return out

    @staticmethod
    def backward(ctx, dout):
        from torch.distributed.tensor.experimental._context_parallel._attention import (
            _templated_ring_attention_backward,
        )

        q, k, v, out, lse = ctx.saved_tensors
        grads = _templated_ring_attention_backward(
            ctx.group, 2, torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward,
            dout.contiguous(), "grad_out", q, k, v, out, lse, ctx.causal, dropout_p=0.0,
        )
        return grads[0], grads[1], grads[2], None, None


@method("torch_ring")
def _torch_ring(cfg: dict, group):
    """Contiguous layout: PyTorch's load balancing is off (its round-robin needs DTensor sharding)."""
    from torch.distributed.tensor.experimental._context_parallel import _attention as cp

    cp._cp_options.enable_load_balance = False
    q, k, v = _qkv(cfg, group, layout="contiguous")
    if cfg["kv_heads"] != cfg["heads"]:
        k, v = (t.detach().repeat_interleave(cfg["heads"] // cfg["kv_heads"], dim=2).requires_grad_() for t in (k, v))
    tensors = [t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v)]
    step = _fwd_bwd(lambda q, k, v: _TorchRing.apply(q, k, v, group, cfg["causal"]), tensors, "contiguous",
                    heads_first=True)
    step.peer = True
    return step


# ------------------------------------------------------------------------------------------- linear attention


def _linear(name: str):
    def build(cfg: dict, group):
        import seqpar.attention as A

        fn = getattr(A, name)
        q, k, v = _qkv(cfg, group, layout="contiguous")
        decay = torch.full((cfg["heads"],), cfg["decay"]) if cfg.get("decay") else None
        return _fwd_bwd(lambda q, k, v: fn(q, k, v, group=group, decay=decay), [q, k, v], "contiguous")

    return build


METHODS["lasp2"] = _linear("lasp2_linear_attention")
METHODS["lasp1"] = _linear("lasp1_linear_attention")


@method("matmul_rate")
def _matmul_rate(cfg: dict, group):
    """torch.mm of two ``mm_size`` x ``mm_size`` float32 matrices: the machine's matmul rate in the same run
    (``cfg["flops"]`` = 2 n^3), what LASP-2's rate on its own FLOPs is measured against."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(cfg["mm_size"], cfg["mm_size"], generator=g) for _ in range(2))

    def step() -> torch.Tensor:
        return torch.mm(a, b)

    step.layout, step.inputs, step.heads_first = None, [a, b], False
    return step


# ------------------------------------------------------------------------------------------- LongLoRA


def _longlora(name: str):
    def build(cfg: dict, group):
        fn = ATTENTIONS[name].load()
        q, k, v = _qkv(cfg, group, layout="contiguous")
        G = int(cfg["seq_len"] * cfg["group_size_ratio"])
        return _fwd_bwd(lambda q, k, v: fn(q, k, v, group_size=G, group=group), [q, k, v], "contiguous")

    return build


METHODS["s2"] = _longlora("s2")
METHODS["sf"] = _longlora("sf")


# ------------------------------------------------------------------------------------------- GPU kernels


def _kernel(backend: str):
    """One block-attention backend of ``seqpar.kernels`` on the whole sequence: forward + backward."""

    def build(cfg: dict, group):
        from seqpar.kernels.softmax import block_attention, block_attention_backward

        q, k, v = _qkv(cfg, None, layout=None, requires_grad=False)
        opts = {"causal": cfg["causal"], "backend": backend}

        def step() -> torch.Tensor:
            out, lse = block_attention(q, k, v, **opts)
            block_attention_backward(torch.ones_like(out), q, k, v, out, lse, **opts)
            return out

        step.layout, step.inputs, step.heads_first = None, [q, k, v], False
        return step

    return build


for _backend in ("torch", "sdpa", "flash_attn"):
    METHODS[f"kernel_{_backend}"] = _kernel(_backend)
