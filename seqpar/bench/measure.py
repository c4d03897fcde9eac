"""Measurement: median of timed repeats after a warm-up, peak memory per rank, machine facts.

Every configuration runs in fresh processes (``seqpar.launcher.spawn_ranks``), so one configuration's peak
memory never leaks into the next. On CPU the peak is the process's peak RSS (``ru_maxrss``) minus its RSS
before the rank's inputs are built (``peak_mem_bytes``: what the rank holds for the call) and minus its RSS
after the warm-up call (``peak_work_bytes``: temporaries only); on CUDA ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import psutil
import torch
import torch.distributed as dist


@dataclass
class Measurement:
    """Per-rank result of one configuration."""

    times_s: list[float]
    peak_mem_bytes: int
    bytes_sent: int | None = 0  # None: the method's traffic bypasses seqpar.comm's counter (a peer)
    bytes_received: int | None = 0
    extra: dict = field(default_factory=dict)

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    def to_dict(self) -> dict:
        return {**asdict(self), "median_s": self.median_s}


# glibc keeps freed blocks in its arenas and returns them lazily, so a process's RSS peak depends on the order
# of earlier frees, not only on what it holds: the memory suite (issue 28) starts its ranks with glibc told to
# return freed blocks at once (no trim threshold; blocks of 64 KiB and more mmap-ed, so a free unmaps them),
# which makes the peak RSS the peak of live memory. Read by glibc at process start, hence set for children.
GLIBC_RETURNS_FREED = {"MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_MMAP_THRESHOLD_": "65536"}


@contextlib.contextmanager
def child_environ(extra: dict[str, str]) -> Iterator[None]:
    """``os.environ`` plus ``extra`` for the processes started inside the block (spawn copies it then)."""
    saved = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def rss_bytes() -> int:
    return psutil.Process(os.getpid()).memory_info().rss


def reset_peak_rss() -> bool:
    """Lower the process's RSS high-water mark (``ru_maxrss``, VmHWM) to its current RSS (Linux >= 4.0:
    ``/proc/self/clear_refs`` "5"), so a later peak is the peak of what runs after this; False if impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class MemoryProbe:
    """Peak memory above the level at construction."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = rss_bytes()

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        return max(0, peak_rss_bytes() - self.base)


def time_repeats(step: Callable[[], object], *, warmup: int, repeats: int, group=None) -> list[float]:
    """Wall time of ``step`` per repeat; ranks start each repeat together and the slowest rank counts."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        if group is not None:
            dist.barrier(group=group)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        if group is not None:
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX, group=group)
        times.append(float(elapsed))
    return times


def machine_info() -> dict:
    import importlib.metadata as md

    def version(pkg: str) -> str:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return "not installed"

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "memory_bytes": psutil.virtual_memory().total,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "versions": {p: version(p) for p in ("seqpar", "transformers", "deepspeed", "peft", "flash-attn")},
    }


class TrackedPeak:
    """Peak bytes of tensor storages allocated inside the ``with`` block and still alive (a dispatch mode: every
    op's outputs are counted once per storage, by ``nbytes``, and released when a weakref finalizer sees the
    storage freed; views and in-place results share an input's storage and are not counted). Exact where RSS is
    not (allocator caching), so the planner's estimates can be checked on CPU; with fake tensors (sizes, no
    memory) it measures a simulated CUDA step (``seqpar.train.simulate``).

    ``device``: count only storages on that device type ("cuda"); None: any but meta. ``workspace``: op name ->
    bytes of the temporary its kernel makes inside (no dispatch mode sees it), counted at the op on top of what
    is live. ``owner``: a label set by the caller (a layer's hooks): ``by_owner`` holds the live bytes made
    while each label was set. ``reset()`` starts a new peak window from what is live."""

    def __init__(self, device: str | None = None, workspace: dict | None = None):
        import weakref

        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        tracker = self
        self.live = self.peak = 0
        self.owner: object = None
        self.by_owner: dict = {}
        self._seen: set[int] = set()

        def counted(t: object) -> bool:
            return isinstance(t, torch.Tensor) and not t.is_meta and (device is None or t.device.type == device)

        def release(key: int, nbytes: int, owner: object) -> None:
            if key in tracker._seen:
                tracker._seen.discard(key)
                tracker.live -= nbytes
                if owner is not None:
                    tracker.by_owner[owner] -= nbytes

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                scratch = (workspace or {}).get(func.overloadpacket.__name__)
                if scratch and args and counted(args[0]):  # freed before the op returns: alive with all live now
                    tracker.peak = max(tracker.peak, tracker.live + scratch(args[0]))
                inputs = {a.untyped_storage()._cdata for a in tree_leaves((args, kwargs))
                          if isinstance(a, torch.Tensor) and not a.is_meta}
                for t in tree_leaves(out):
                    if counted(t):
                        st = t.untyped_storage()
                        key, n = st._cdata, st.nbytes()
                        if n and key not in tracker._seen and key not in inputs:
                            tracker._seen.add(key)
                            tracker.live += n
                            tracker.peak = max(tracker.peak, tracker.live)
                            if tracker.owner is not None:
                                tracker.by_owner[tracker.owner] = tracker.by_owner.get(tracker.owner, 0) + n
                            weakref.finalize(st, release, key, n, tracker.owner)
                return out

        self._mode = Mode()

    def reset(self) -> None:
        self.peak = self.live

    def __enter__(self) -> TrackedPeak:
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)
