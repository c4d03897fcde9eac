"""Run benchmark configurations side by side, each in fresh processes, and collect per-rank measurements."""

from __future__ import annotations

import torch

import seqpar.bench.hybrid  # (registers the gdn_* and lightning_* methods)
import seqpar.bench.training  # noqa: F401  (registers the llama_* methods)
from seqpar.bench.measure import (
    GLIBC_RETURNS_FREED,
    Measurement,
    MemoryProbe,
    TrackedPeak,
    child_environ,
    reset_peak_rss,
    time_repeats,
)
from seqpar.bench.methods import METHODS
from seqpar.comm import ByteCounter
from seqpar.launcher import RankFailed, spawn_ranks


def _preload() -> None:
    """Import what the first ``backward(grad)`` of a process imports (``torch.autograd`` checks the given
    gradient through its symbolic-shape helpers: 486 modules, sympy and mpmath among them, ~39 MiB of RSS,
    measured), so that constant of the process stays out of every row's peak, the baselines' included."""
    torch.zeros(2, requires_grad=True).mul(2).backward(torch.ones(2))


def _run_rank(rank: int, world: int, group, cfg: dict) -> dict:
    torch.manual_seed(0)
    sp_group = group if world > 1 else None
    device = torch.device(cfg.get("device", "cpu"))
    # Per-rank memory: everything this rank holds for the call (its shard of inputs, gradients, outputs,
    # buffers and temporaries), i.e. above the RSS before the inputs exist: this is what SP divides.
    _preload()
    total = MemoryProbe(device)
    step = METHODS[cfg["method"]](cfg, sp_group)
    tracked = TrackedPeak() if cfg.get("tracked") else None  # live tensor storages of the first call
    with ByteCounter() as counter:  # the first (warm-up) call also counts the bytes of one call
        if tracked is None:
            result = step()
        else:
            with tracked:
                result = step()
    extra = {"loss": float(result)} if result.dim() == 0 else {}  # training steps return their loss
    live = cfg.get("live_peak") and device.type == "cpu"
    if live:
        # Issue 28's measure (the memory suite): what one call holds above its inputs, without one-time costs
        # (imports, gloo's pair buffers, thread-pool stacks). After the warm-up, drop its output and input
        # gradients and forget the warm-up's peak: the work probe's base is then the inputs and one-time costs,
        # and its peak over the repeats is the call's output, dO, gradients and temporaries.
        del result
        for t in getattr(step, "inputs", ()):
            t.grad = None
        live = reset_peak_rss()  # False (no /proc/self/clear_refs): the peak still holds the warm-up's
    extra["live_peak"] = bool(live)
    # Working memory: above the level after the warm-up (inputs and their gradients allocated, lazily loaded
    # kernels loaded); without ``live_peak`` ru_maxrss still holds the warm-up's peak, the same computation as
    # every repeat.
    work = MemoryProbe(device)
    times = time_repeats(step, warmup=max(0, cfg["warmup"] - 1), repeats=cfg["repeats"], group=sp_group)
    # Peers communicate through torch.distributed directly: their bytes are unknown, not zero.
    sent, received = (None, None) if getattr(step, "peer", False) else (counter.sent, counter.received)
    extra["peak_work_bytes"] = work.peak()
    return Measurement(times, total.peak() if tracked is None else tracked.peak, sent, received, extra).to_dict()


def run_config(cfg: dict, *, timeout: float) -> dict:
    """One configuration in ``cfg['world']`` fresh processes with ``cfg['threads']`` threads each."""
    if "skipped" in cfg:
        return cfg
    if "search" in cfg:
        from seqpar.bench.scaling import run_search

        return run_search(cfg, timeout=timeout)
    env = GLIBC_RETURNS_FREED if cfg.get("live_peak") else {}
    try:
        with child_environ(env):
            ranks = spawn_ranks(_run_rank, cfg["world"], args=(cfg,), threads=cfg["threads"], timeout=timeout)
    except RankFailed as err:
        return {**cfg, "error": str(err).strip().splitlines()[-1][:300]}
    row = {
        **cfg,
        "median_s": max(r["median_s"] for r in ranks),
        "peak_mem_bytes": max(r["peak_mem_bytes"] for r in ranks),
        "peak_work_bytes": max(r["extra"]["peak_work_bytes"] for r in ranks),
        "bytes_sent_per_rank": None if ranks[0]["bytes_sent"] is None else max(r["bytes_sent"] for r in ranks),
        "ranks": ranks,
    }
    if "loss" in ranks[0]["extra"]:
        row["loss"] = ranks[0]["extra"]["loss"]
    row["live_peak"] = all(r["extra"]["live_peak"] for r in ranks)  # what was measured, not what was asked
    return row
