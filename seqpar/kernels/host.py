"""Host reads: the one door through which seqpar reads the values of a tensor on the host.

On a GPU every such read (``.tolist()``, ``.item()``, ``bool(t)``, ``int(t)``) waits for the device to finish
all queued work: a host sync. seqpar's hot paths (everything that runs per layer or per step) read nothing;
the few deliberate reads are setup-time or first-forward validation, and each goes through
:func:`host_read` under a site named in :data:`SITES`, which says why it is allowed. Every read is counted
(:func:`read_counts`), so a test can assert exactly which reads one forward or one step performs.

Under fake tensors (``torch._subclasses.fake_tensor.FakeTensorMode``, ``seqpar.fake_cuda``) values do not
exist: a read raises ``DataDependentOutputException``, which is how the fake-CUDA test finds undeclared reads.
A declared read instead takes the value its site supplies (``fake=``): what every rank of a consistent job
would read, e.g. this rank's own shapes for the cross-rank shape check. A process group of the ``"fake"``
backend (``seqpar.fake_cuda.fake_group``) moves no data either, so the gathers of a declared read use the
same stand-in there, with real tensors too.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

import torch

# site -> why reading there is allowed (said once, here; the call sites name their site)
SITES: dict[str, str] = {
    "shape_check": "cross-rank validation: every rank's shapes and options in one all-gather, at the first "
                   "layer of a forward only (patch_model passes validate=False to the others)",
    "cu_seqlens": "packed-document boundaries become host ints once per tensor (sharding.host_bounds): the "
                  "kernels' plans are cut on the host, so no layer reads them again",
    "position_check": "a patched model's first forward on a device checks the global position ids (one "
                      "flag, all-reduced); later forwards skip it",
    "padding_check": "shard_batch refuses left padding (one flag per batch; free for a CPU batch)",
    "subgroups": "patch_model creates USP's sub-groups once: every rank's SP group members, gathered as "
                 "Python objects",
    "decode_positions": "decoding chunked attention with a KV cache (one device, generation): the last "
                        "position the cache holds",
    "decay_check": "a learned decay tensor's range check in linear attention (CPU tensors only: on a device "
                   "the check is skipped, see checks.check_linear_args)",
    "step_loss": "the trainer logs each optimizer step's token-mean loss and token count: one read per step, "
                 "after the last micro-batch's backward and the optimizer step are queued",
    "eval_loss": "an evaluation's token-mean loss over every batch and rank: one read at its end",
    "grad_norm": "the FSDP2 engine's gradient norm for the step's log line, read after the step's loss "
                 "(DeepSpeed reads its own inside its engine)",
    "setup_describe": "the FSDP2 engine's startup line: its sharded element count, summed once at setup",
}

_COUNTS: collections.Counter = collections.Counter()


def is_fake(t: object) -> bool:
    """Whether ``t`` is a fake tensor (shape, dtype and device only: its values cannot be read)."""
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


def fake_backend(group: Any) -> bool:
    """Whether ``group`` belongs to the ``"fake"`` backend (torch.testing's fake process group): its collectives
    return at once and leave the outputs as they were."""
    import torch.distributed as dist

    return group is not None and dist.is_initialized() and dist.get_backend(group) == "fake"


def simulated(t: object = None, group: Any = None) -> bool:
    """A fake tensor or a fake group: the value of a declared read comes from its site's stand-in."""
    return is_fake(t) or fake_backend(group)


def host_read(t: torch.Tensor, site: str, fake: Callable[[], Any] | None = None, *, group: Any = None) -> Any:
    """``t.tolist()`` (a Python number for a 0-d tensor), counted under ``site`` (a key of :data:`SITES`).

    ``fake`` gives the value when ``t`` cannot be read (a fake tensor) or was gathered over a fake ``group``;
    without one such a read raises, as any undeclared read does.
    """
    if site not in SITES:
        raise ValueError(f"host_read site={site!r} is not declared: add it to seqpar.kernels.host.SITES with why")
    _COUNTS[site] += 1
    if fake is not None and simulated(t, group):
        return fake()
    return t.tolist()


def count(site: str) -> None:
    """Count a declared read that does not go through a tensor (e.g. ``all_gather_object``)."""
    if site not in SITES:
        raise ValueError(f"host read site={site!r} is not declared: add it to seqpar.kernels.host.SITES with why")
    _COUNTS[site] += 1


def read_counts(*, reset: bool = False) -> dict[str, int]:
    """Declared reads per site since the last reset (every process counts its own)."""
    out = dict(_COUNTS)
    if reset:
        _COUNTS.clear()
    return out
