"""The compiled CPU kernel of chunked linear attention (``csrc/linear_attention.cpp``), built on first use.

Same algorithm and results as ``seqpar.kernels.linear`` (Lightning Attention-2; exact to float rounding), but
every block product is one BLAS call on the [B, L, H, D] storage itself: no block copies, no scaling passes
over whole tensors, no per-op dispatch, and the state scan is the GEMM's beta. Measured on the 2-core dev
machine, LASP-2 at N=2, L=32k (16k per rank), one thread per rank, forward + backward: 1.35x faster than the
PyTorch kernel (docs/benchmarks.md).

It is used for float32/float64 CPU tensors (bf16/fp16 inputs are upcast to float32 by the callers, as for
every CPU kernel here). ``SEQPAR_LINEAR_KERNEL=torch`` selects the PyTorch kernel instead. The build needs a
C++ compiler and ninja (a DeepSpeed dependency) and takes ~30 s once per machine (cached by PyTorch in
``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``; ``make setup`` builds it); if it fails,
one warning says why and the PyTorch kernel runs. ``python -m seqpar.kernels.linear_cpu`` builds it.
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).parent / "csrc" / "linear_attention.cpp"
ENV = "SEQPAR_LINEAR_KERNEL"
MODES = ("auto", "torch")


def mode() -> str:
    value = os.environ.get(ENV, "auto")
    if value not in MODES:
        raise ValueError(f"{ENV}={value!r}: use one of {MODES}")
    return value


@functools.lru_cache(maxsize=1)
def extension():
    """The built module, or None (with one warning) where it cannot be built or loaded."""
    try:
        from torch.utils.cpp_extension import load

        return load(name="seqpar_linear_cpu", sources=[str(SOURCE)], extra_cflags=["-O3"], verbose=False)
    except Exception as e:  # no compiler/ninja, or a BLAS without sgemm_: the PyTorch kernel is exact too
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        os.environ[ENV] = "torch"  # processes started from this one (ranks, torchrun) do not retry the build
        warnings.warn(f"seqpar: the compiled CPU linear-attention kernel is unavailable ({reason}); using the "
                      f"PyTorch kernel (slower). Set {ENV}=torch to skip the build.", stacklevel=2)
        return None


def usable(x: torch.Tensor) -> bool:
    """Whether the compiled kernel computes calls on tensors like ``x`` (heads-first, accumulation dtype)."""
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and x.shape[2] > 0
            and mode() == "auto" and extension() is not None)


def describe() -> str:
    """For ``seqpar env``: which kernel CPU linear attention runs (builds the compiled one if needed)."""
    if mode() == "torch":
        return f"pytorch ({ENV}=torch)"
    return "compiled" if extension() is not None else "pytorch (the compiled kernel did not build)"


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _like(x: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor | None:
    return None if x is None else x.to(q.dtype)


def forward(q, k, v, log_decay, block_size: int, prefix):
    return extension().forward(_unit(q), _unit(k), _unit(v), _like(log_decay, q), block_size, _like(prefix, q))


def state(k, v, log_decay):
    return extension().state(_unit(k), _unit(v), _like(log_decay, k))


def state_grads(q, dout, log_decay, block_size: int):
    """``(G [runs, B, H, Dk, Dv], dP)``: the state gradient at each run's end from later runs, and at the start."""
    return tuple(extension().state_grads(_unit(q), _unit(dout), _like(log_decay, q), block_size))


def backward(dout, q, k, v, log_decay, block_size: int, prefix, final_grad, run_grads):
    """``(dq, dk, dv)``; ``run_grads`` from ``state_grads``, ``final_grad`` dLoss/d(state after the last token)."""
    return tuple(extension().backward(_unit(dout), _unit(q), _unit(k), _unit(v), _like(log_decay, q), block_size,
                                      _like(prefix, q), _like(final_grad, q), _like(run_grads, q)))


if __name__ == "__main__":
    mod = extension()
    print("seqpar compiled CPU linear-attention kernel:", "built" if mod is not None else "NOT available")
    raise SystemExit(0 if mod is not None else 1)
