"""Tiled MLP (ALST, Bekman et al. 2025, Sec. 3.2): each decoder MLP runs over sequence tiles, recomputed in
the backward, so its ``[B, L/N, 3.5 d]`` intermediates (gate, up, their product: Llama-3's MLP ratio) exist
for one tile of ``chunk_size`` tokens at a time instead of the whole shard.

We reuse DeepSpeed's ``TiledMLP`` autograd function (deepspeed.runtime.sequence_parallel.ulysses_sp): its
forward runs the tiles under no_grad and keeps only the input; its backward recomputes each tile and
backpropagates the real incoming gradient into it, so parameter gradients get every scaling of the loss, and
it tells ZeRO (``ds_grad_is_ready``) to reduce them once, after the last tile. The MLP's own ``forward`` is
what each tile runs (Llama, Mistral, Qwen2, Qwen3, Gemma 3 and Linear-Llama share the gate/up/down shape; peft
layers inside work unchanged).

Memory per MLP: ``chunk_size x intermediate_size x 3`` activations during its forward/backward instead of
``L/N x intermediate_size x 3``; cost: one more MLP forward per step (twice with gradient checkpointing, as
DeepSpeed notes). No communication; every rank of an SP group has the same L/N, so the same number of tiles
(ZeRO-3 gathers parameters per tile call: equal counts keep ranks in step).
"""

from __future__ import annotations

import math
from typing import Any

import torch

# Dense, position-wise MLPs (gate/up/down, no state, no aux loss). Linear-Llama's layers use LlamaMLP.
MLP_CLASSES = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "Gemma3MLP")


def _mlps(model: Any) -> list[torch.nn.Module]:
    return [m for m in model.modules() if type(m).__name__ in MLP_CLASSES]


def _tiled_forward(mlp: torch.nn.Module, chunk_size: int):
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    own = type(mlp).forward  # the model's own MLP code runs on each tile

    def forward(x: torch.Tensor) -> torch.Tensor:
        tiles = max(1, math.ceil(x.shape[-2] / chunk_size))
        if tiles == 1:
            return own(mlp, x)
        if not torch.is_grad_enabled():  # eval, or a reentrant checkpoint's forward: tiles, nothing to save
            return torch.cat([own(mlp, t) for t in x.chunk(tiles, dim=-2)], dim=-2)
        params = [p for p in mlp.parameters() if p.requires_grad]
        return TiledMLP.apply(own, mlp, x, tiles, params)

    forward.tiled = chunk_size
    return forward


def tile_mlp(model: Any, chunk_size: int = 4096) -> int:
    """Run every decoder MLP of ``model`` over sequence tiles of ``chunk_size`` tokens (per rank) with
    recomputation; returns how many MLPs were tiled. ValueError if none is found or chunk_size < 1."""
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r}: must be a positive number of tokens (e.g. 4096)")
    mlps = _mlps(model)
    if not mlps:
        raise ValueError(f"tile_mlp found no {'/'.join(MLP_CLASSES)} in {type(model).__name__}: tiled MLPs "
                         "support Llama, Mistral, Qwen2, Qwen3, Gemma 3 and Linear-Llama (set memory.tiled_mlp=false)")
    for mlp in mlps:
        mlp.forward = _tiled_forward(mlp, chunk_size)
    return len(mlps)


def untile_mlp(model: Any) -> int:
    """Undo ``tile_mlp``; returns how many MLPs were restored."""
    restored = 0
    for mlp in _mlps(model):
        if hasattr(vars(mlp).get("forward"), "tiled"):
            del mlp.forward
            restored += 1
    return restored
