"""Run benchmark configurations side by side, each in fresh processes, and collect per-rank measurements."""

from __future__ import annotations

import torch

from seqpar.bench.measure import MemoryProbe, Measurement, time_repeats
from seqpar.bench.methods import METHODS
from seqpar.comm import ByteCounter
from seqpar.launcher import RankFailed, spawn_ranks


def _run_rank(rank: int, world: int, group, cfg: dict) -> dict:
    torch.manual_seed(0)
    sp_group = group if world > 1 else None
    step = METHODS[cfg["method"]](cfg, sp_group)
    with ByteCounter() as counter:  # the first (warm-up) call also counts the bytes of one call
        step()
    # Baseline after the warm-up: lazily loaded kernels and libraries are not activation memory. ru_maxrss
    # still holds the warm-up's peak, which is the same computation as every timed repeat.
    probe = MemoryProbe(torch.device("cpu"))
    times = time_repeats(step, warmup=max(0, cfg["warmup"] - 1), repeats=cfg["repeats"], group=sp_group)
    return Measurement(times, probe.peak(), counter.sent, counter.received).to_dict()


def run_config(cfg: dict, *, timeout: float) -> dict:
    """One configuration in ``cfg['world']`` fresh processes with ``cfg['threads']`` threads each."""
    try:
        ranks = spawn_ranks(_run_rank, cfg["world"], args=(cfg,), threads=cfg["threads"], timeout=timeout)
    except RankFailed as err:
        return {**cfg, "error": str(err).strip().splitlines()[-1][:300]}
    return {
        **cfg,
        "median_s": max(r["median_s"] for r in ranks),
        "peak_mem_bytes": max(r["peak_mem_bytes"] for r in ranks),
        "bytes_sent_per_rank": max(r["bytes_sent"] for r in ranks),
        "ranks": ranks,
    }
