"""Spawn W local gloo (or nccl) processes, run a function on each, and return what every rank produced.

    results = spawn_ranks(check_ring, world_size=4, args=(cases,))

``fn(rank, world_size, group, *args)`` must be a module-level function (spawn pickles it by reference);
``group`` is the world group of the spawned ranks. Each rank runs with ``threads`` threads (default 1).
Used by ``seqpar demo``, ``seqpar bench`` and the test suite; under torchrun nothing is spawned.

A rank's exception fails the call with that rank's traceback; ranks that stop answering (a hung
collective) fail it after ``timeout`` seconds with the ranks that never reported. Every child is killed
before returning, so a hang never leaks into the next test.
"""

from __future__ import annotations

import contextlib
import io
import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.multiprocessing as mp

DEFAULT_TIMEOUT = 180.0

__all__ = ["RankFailed", "free_port", "spawn_ranks"]


class RankFailed(RuntimeError):
    """A spawned rank raised, or the ranks hung."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dumps(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, results, threads: int,
            backend: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(threads)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)  # one GPU per rank
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=120))
        out = fn(rank, world_size, dist.group.WORLD, *args)
        results.put((rank, True, _dumps(out)))
    except BaseException:  # report everything, including assertion errors inside the rank
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()


def spawn_ranks(
    fn: Callable, world_size: int, args: tuple = (), *, timeout: float = DEFAULT_TIMEOUT, threads: int = 1,
    backend: str = "gloo", start_method: str = "spawn",
) -> list[Any]:
    """Run ``fn(rank, world_size, group, *args)`` on ``world_size`` ranks of ``backend`` ("gloo"; "nccl" puts
    rank r on GPU r); return the per-rank results. ``start_method``: multiprocessing's ("forkserver": the test
    suite's ranks skip re-importing torch, tests/dist.py)."""
    ctx = mp.get_context(start_method)
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, results, threads, backend), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    got: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(got) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(got))
                raise RankFailed(f"{fn.__name__} on {world_size} ranks: ranks {missing} did not finish within "
                                 f"{timeout:.0f}s (a hung collective?)")
            try:
                rank, ok, payload = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if r not in got and p.exitcode not in (None, 0)]
                if dead:
                    raise RankFailed(f"{fn.__name__}: ranks {dead} died (exit codes "
                                     f"{[procs[r].exitcode for r in dead]}) without reporting") from None
                continue
            if not ok:
                raise RankFailed(f"{fn.__name__} failed on rank {rank} of {world_size}:\n{payload}")
            got[rank] = torch.load(io.BytesIO(payload), weights_only=False)
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
    return [got[r] for r in range(world_size)]
