"""Fake CUDA on a CPU-only PyTorch build: run seqpar's CUDA code paths, forward and backward, with no GPU.

Under ``torch._subclasses.fake_tensor.FakeTensorMode`` a tensor on ``device="cuda"`` has a shape, a dtype and a
device but no memory; every aten op runs its meta/fake implementation (the fused attention kernels included)
and a data-dependent read (``.item()``, ``.tolist()``, a Python ``if`` on a tensor), which on a GPU is a host
sync, raises ``DataDependentOutputException``. A CPU-only build lacks two pieces for this: a device guard for
CUDA (slicing, ``.contiguous()``, ``copy_`` and ``.to("cuda")`` abort) and CUDA hooks that name CUDA as the
accelerator (the autograd engine needs it to run a backward over CUDA tensors). ``csrc/fake_cuda.cpp``
provides both (c10's ``FakeGuardImpl`` and hooks that report one device and initialise nothing). The hooks are
read during ``import torch``, so the library must be loaded first: :func:`environ` gives a child process the
``LD_PRELOAD`` that does it, and :func:`active` tells a process whether it has it.

    subprocess.run([sys.executable, "worker.py"], env=fake_cuda.environ(), check=True)
    # worker.py
    assert fake_cuda.active()
    with FakeTensorMode(), fake_cuda.fake_group(rank=0, world_size=8) as group:
        q = torch.randn(1, 4096, 8, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        ring_attention(q, q, q, group=group).sum().backward()

Real CUDA tensors still fail in such a process (there is no CUDA library), and ``torch.cuda.is_available()``
stays False: only fake tensors are CUDA here. seqpar's deliberate host reads go through
``seqpar.kernels.host.host_read``, which gives fake tensors and fake groups their declared stand-in values;
tests/test_cuda_paths.py and docs/gpu.md use all of this. The build (~20 s once per machine, cached by PyTorch in
``$TORCH_EXTENSIONS_DIR``) runs in a child process, so the building process is left unchanged.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

SOURCE = Path(__file__).parent / "kernels" / "csrc" / "fake_cuda.cpp"
NAME = "seqpar_fake_cuda"


def _build_here() -> str:
    """Compile the library in this process (used by the child :func:`library` starts) and return its path."""
    from torch.utils.cpp_extension import _get_build_directory, load

    load(name=NAME, sources=[str(SOURCE)], is_python_module=False, verbose=False)
    return os.path.join(_get_build_directory(NAME, False), f"{NAME}.so")


@functools.lru_cache(maxsize=1)
def library() -> Path:
    """The compiled shim (built on first use, in a child process so this one does not load it)."""
    code = "import sys; from seqpar.fake_cuda import _build_here; sys.stdout.write(_build_here())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["unknown error"])[-1]
        raise RuntimeError(f"seqpar: the fake-CUDA shim did not build ({last}); it needs a C++ compiler and ninja")
    return Path(done.stdout.strip().splitlines()[-1])


def environ(base: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of ``base`` (default ``os.environ``) whose Python processes start with fake CUDA."""
    import torch

    env = dict(os.environ if base is None else base)
    torch_lib = str(Path(torch.__file__).parent / "lib")
    env["LD_PRELOAD"] = " ".join(p for p in (str(library()), env.get("LD_PRELOAD", "")) if p)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (torch_lib, env.get("LD_LIBRARY_PATH", "")) if p)
    env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0")
    return env


def active() -> bool:
    """Whether this process was started with the shim (CUDA fake tensors can run forward and backward)."""
    try:
        return bool(ctypes.CDLL(None).seqpar_fake_cuda_installed())
    except AttributeError:
        return False


@contextlib.contextmanager
def fake_group(rank: int, world_size: int) -> Iterator[object]:
    """A fake process group of ``world_size`` ranks seen as ``rank``: collectives return at once, unchanged.

    Under FakeTensorMode the outputs are fake tensors of the right shapes, so every rank's view of a
    distributed algorithm (first, middle, last) can be simulated in turn in one process.
    """
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("seqpar: fake_group needs a process without a default process group")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":  # python -m seqpar.fake_cuda: build the shim and say where it is
    print(library())
