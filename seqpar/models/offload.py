"""Checkpoint offload (ALST, Bekman et al. 2025, Sec. 3.3): the input each gradient-checkpointed decoder
layer keeps for its recomputation (``[B, L/N, d]``, the only activation a checkpointed layer holds between
forward and backward) lives in pinned CPU memory instead of on the GPU, and is copied back for the
layer's recomputation.

How: each layer's checkpoint becomes the reentrant ``torch.utils.checkpoint`` (its only saved tensors are
its inputs, through ``ctx.save_for_backward``) inside ``torch.autograd.graph.save_on_cpu(pin_memory=True)``,
which moves exactly those saved tensors to CPU. (The non-reentrant checkpoint keeps its inputs alive by
reference, out of reach of saved-tensor hooks.) Memory: ``num_layers x B x L/N x d x bytes`` leave the GPU;
traffic: that much to the host in the forward and back in the backward, per step.

On a machine without CUDA there is nothing to offload to: ``enable_checkpoint_offload`` returns False and
changes nothing (the trainer prints a note).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint


def offloaded_checkpoint(function, *args, pin_memory: bool = True):
    """``checkpoint(function, *args)`` whose saved inputs live on the CPU. A first input that does not
    require grad (frozen embeddings under LoRA) is made to, so the reentrant checkpoint still produces the
    parameter gradients."""
    args = list(args)
    if args and isinstance(args[0], torch.Tensor) and not args[0].requires_grad and torch.is_grad_enabled():
        args[0] = args[0].detach().requires_grad_()
    with torch.autograd.graph.save_on_cpu(pin_memory=pin_memory):
        return checkpoint(function, *args, use_reentrant=True)


def enable_checkpoint_offload(model: Any, *, force: bool = False) -> bool:
    """Make every gradient-checkpointed layer of ``model`` offload its saved input to pinned CPU memory.
    Needs ``model.gradient_checkpointing_enable()`` first. Returns False (a no-op) without CUDA unless
    ``force`` (tests: the same code path, CPU to CPU)."""
    cuda = torch.cuda.is_available()
    if not (cuda or force):
        return False
    layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)
              and hasattr(m, "_gradient_checkpointing_func")]
    if not layers:
        raise ValueError("checkpoint offload needs gradient checkpointing: set trainer.gradient_checkpointing=true "
                         "or memory.offload_checkpoints=false")
    for layer in layers:
        layer._gradient_checkpointing_func = partial(offloaded_checkpoint, pin_memory=cuda)
    return True
