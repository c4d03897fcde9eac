"""The longest sequence a fixed per-rank memory budget trains: doubling search on L, then bisection.

A probe is one training step (``seqpar.bench.training``: forward + loss + backward) at global length L on
N ranks; its cost is the peak memory per rank (max over ranks) above the level after a warm-up step at the
smallest length: RSS high-water mark on CPU (``ru_maxrss``), ``max_memory_allocated`` on CUDA.

1. Doubling, in ONE set of N processes: L = start, 2 start, 4 start, ... until a probe exceeds the budget or
   L passes ``max_len``. Lengths only grow, so the high-water mark after probe k is probe k's own peak (an
   earlier, shorter probe can only make it an over-estimate: the search errs on the safe side).
2. Bisection between the last fitting and the first failing length (``refine`` rounds, lengths rounded to
   multiples of ``start``), each probe in fresh processes so an earlier, longer probe cannot mask it.

Ranks decide together (the peak is all-reduced before the stop test), so no rank waits on a stopped peer.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

import seqpar.bench.training  # noqa: F401  (registers the llama_* methods)
from seqpar.bench.measure import MemoryProbe, TrackedPeak
from seqpar.bench.methods import METHODS
from seqpar.launcher import RankFailed, spawn_ranks


def _probe_rank(rank: int, world: int, group, cfg: dict, lengths: list[int]) -> list[dict]:
    sp_group = group if world > 1 else None
    budget = cfg["search"]["budget_bytes"]
    METHODS[cfg["method"]]({**cfg, "seq_len": cfg["search"]["start"]}, sp_group)()  # warm-up: not activations
    probe = MemoryProbe(torch.device(cfg.get("device", "cpu")))
    probes = []
    for L in lengths:
        step = METHODS[cfg["method"]]({**cfg, "seq_len": L}, sp_group)
        start = time.perf_counter()
        if cfg.get("tracked"):  # live tensor storages of the step (exact; RSS keeps allocator caches)
            with TrackedPeak() as tracked:
                step()
            peak = tracked.peak
        else:
            step()
            peak = probe.peak()
        stats = torch.tensor([peak, time.perf_counter() - start], dtype=torch.float64)
        if sp_group is not None:
            dist.all_reduce(stats, op=dist.ReduceOp.MAX, group=sp_group)
        probes.append({"seq_len": L, "peak_mem_bytes": int(stats[0]), "seconds": float(stats[1])})
        del step
        if stats[0] > budget:
            break
    return probes


def _probe(cfg: dict, lengths: list[int], timeout: float) -> list[dict]:
    return spawn_ranks(_probe_rank, cfg["world"], args=(cfg, lengths), threads=cfg["threads"], timeout=timeout)[0]


def doubling(start: int, max_len: int) -> list[int]:
    lengths = [start]
    while lengths[-1] * 2 <= max_len:
        lengths.append(lengths[-1] * 2)
    return lengths


def run_search(cfg: dict, *, timeout: float) -> dict:
    """One scaling row: ``max_seq_len`` within ``cfg['search']['budget_bytes']`` per rank, and every probe."""
    s = cfg["search"]
    try:
        probes = _probe(cfg, doubling(s["start"], s["max_len"]), timeout)
        fits = lambda p: p["peak_mem_bytes"] <= s["budget_bytes"]  # noqa: E731
        lo = max((p["seq_len"] for p in probes if fits(p)), default=None)
        hi = min((p["seq_len"] for p in probes if not fits(p)), default=None)
        for _ in range(s.get("refine", 0)):
            if lo is None or hi is None or hi - lo <= s["start"]:
                break
            mid = (lo + hi) // 2 // s["start"] * s["start"]
            probe = _probe(cfg, [mid], timeout)[0]
            probes.append(probe)
            lo, hi = (mid, hi) if fits(probe) else (lo, mid)
    except RankFailed as err:
        return {**cfg, "error": str(err).strip().splitlines()[-1][:300]}
    limit = "budget" if hi is not None else "max_len"
    return {**cfg, "max_seq_len": lo, "first_over_budget": hi, "limited_by": limit,
            "probes": sorted(probes, key=lambda p: p["seq_len"])}
