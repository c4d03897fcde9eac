"""``seqpar demo``: shard a random sequence over N CPU ranks, run sequence-parallel attention, and compare
output and gradients with the float64 dense reference (``seqpar.kernels.reference``) on the whole sequence."""

from __future__ import annotations

import argparse
import time

import torch

from seqpar.launcher import spawn_ranks


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nproc", type=int, default=2, help="number of CPU ranks to spawn (default 2)")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)


def _rank_main(rank: int, world: int, group, cfg: dict) -> dict:
    from seqpar.attention import ring_attention
    from seqpar.sharding import shard, unshard

    g = torch.Generator().manual_seed(0)
    B, L, H, Hkv, D = 1, cfg["seq_len"], cfg["heads"], cfg["kv_heads"], cfg["head_dim"]
    q = torch.randn(B, L, H, D, generator=g)
    k, v = (torch.randn(B, L, Hkv, D, generator=g) for _ in range(2))
    dout = torch.randn(B, L, H, D, generator=g)
    local = [shard(t, group=group, layout="zigzag").requires_grad_() for t in (q, k, v)]
    start = time.perf_counter()
    out = ring_attention(*local, group=group, causal=True, layout="zigzag")
    out.backward(shard(dout, group=group, layout="zigzag"))
    elapsed = time.perf_counter() - start
    full_out = unshard(out.detach(), group=group, layout="zigzag")
    full_grads = [unshard(t.grad, group=group, layout="zigzag") for t in local]
    if rank != 0:
        return {}
    from seqpar.kernels.reference import causal_mask, dense_attention

    ref = [t.double().requires_grad_() for t in (q, k, v)]
    ref_out, _ = dense_attention(*ref, causal_mask(L, L))
    ref_out.backward(dout.double())
    errs = {"out": (full_out - ref_out).abs().max().item()}
    for name, got, want in zip("qkv", full_grads, ref):
        errs[f"d{name}"] = (got - want.grad).abs().max().item()
    return {"errors": errs, "seconds": elapsed}


def run(args: argparse.Namespace) -> int:
    cfg = {"seq_len": args.seq_len, "heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim}
    print(f"ring attention (zigzag, causal, GQA {args.heads}/{args.kv_heads} heads) over {args.nproc} CPU ranks, "
          f"L={args.seq_len}, vs the float64 dense reference:")
    result = spawn_ranks(_rank_main, args.nproc, args=(cfg,))[0]
    for name, err in result["errors"].items():
        print(f"  max |{name} - reference| = {err:.2e}")
    ok = max(result["errors"].values()) < 1e-4
    print(f"  forward+backward on rank 0: {result['seconds'] * 1e3:.0f} ms -> {'EXACT' if ok else 'MISMATCH'}")
    return 0 if ok else 1
