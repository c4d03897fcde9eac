"""The recipe's ``memory:`` section: checks, and applying it to the model (fused loss, tiled MLP, checkpoint
offload; seqpar.models.fused_loss / tiled_mlp / offload explain each)."""

from __future__ import annotations

from typing import Any

from seqpar.train.recipe import Recipe, RecipeError


def check_memory(r: Recipe, errors: list[str], *, cuda: bool | None = None) -> None:
    """Append one message per problem of ``memory:``; ``cuda`` (None: unknown, e.g. --dry-run elsewhere)."""
    m = r.memory
    for key in ("loss_chunk_size", "mlp_chunk_size"):
        if getattr(m, key) < 1:
            errors.append(f"memory.{key}={getattr(m, key)}: must be a positive number of tokens (e.g. 1024)")
    if m.fused_loss and r.lora.enabled and "lm_head" in r.lora.targets:
        errors.append("memory.fused_loss=true needs the output head to be a plain linear layer, but lora.targets "
                      "puts LoRA on lm_head: drop lm_head from lora.targets (lora.trainable=[lm_head] trains it "
                      "fully) or set memory.fused_loss=false")
    if m.offload_checkpoints and not r.trainer.gradient_checkpointing:
        errors.append(f"memory.offload_checkpoints={m.offload_checkpoints!r} offloads gradient checkpoints: set "
                      "trainer.gradient_checkpointing=true or memory.offload_checkpoints=false")
    if m.offload_checkpoints == "required" and cuda is False:
        errors.append("memory.offload_checkpoints='required' but no CUDA GPU is visible (nothing to offload from): "
                      "run on a GPU node or set memory.offload_checkpoints=true (a no-op on CPU)")


def loss_chunk(recipe: Recipe) -> int | None:
    """``chunk_size`` for seqpar.models.causal_lm_loss: None (full logits) unless memory.fused_loss."""
    return recipe.memory.loss_chunk_size if recipe.memory.fused_loss else None


def apply_memory(model: Any, recipe: Recipe, *, force_offload: bool = False) -> str:
    """Tile the MLPs, offload checkpoints, check the head for the fused loss; returns a one-line note.
    ``force_offload``: offload checkpoints without CUDA too (``--simulate``'s fake CUDA)."""
    from seqpar.models.fused_loss import FusedHeadError, output_head
    from seqpar.models.offload import enable_checkpoint_offload
    from seqpar.models.tiled_mlp import tile_mlp

    m, notes = recipe.memory, []
    if m.fused_loss:
        try:
            output_head(model)
        except FusedHeadError as err:
            raise RecipeError(str(err)) from err
        notes.append(f"fused loss (tiles of {m.loss_chunk_size} tokens)")
    if m.tiled_mlp:
        try:
            tile_mlp(model, m.mlp_chunk_size)
        except ValueError as err:
            raise RecipeError(str(err)) from err
        notes.append(f"tiled MLP (tiles of {m.mlp_chunk_size} tokens)")
    if m.offload_checkpoints:
        on = enable_checkpoint_offload(model, force=force_offload)
        notes.append("checkpoint offload to pinned CPU memory" if on else
                     "checkpoint offload skipped: no CUDA (checkpoints already live in host memory)")
    return "memory: " + (", ".join(notes) if notes else "no options")
