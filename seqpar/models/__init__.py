"""Integration with model code: seqpar attention inside Hugging Face models, SP batches and loss, and the
memory options (tiled MLP, checkpoint offload), the API of a training loop that is not ``seqpar train``:

* ``patch_model(model, attention, parallel)`` / ``unpatch_model``: every attention layer runs an SP primitive
  over the group; ``patched_layout(model)`` is the layout to shard in; ``attention_calls`` counts what ran.
* ``shard_batch(batch, parallel, layout)``: this rank's shard, labels shifted over the whole sequence first,
  global position ids, packed documents as global ``cu_seqlens``.
* The SP losses: ``sp_cross_entropy`` (from logits), ``sp_fused_linear_cross_entropy`` (head fused, no logits),
  ``causal_lm_loss`` (either, from the model), ``sp_global_mean`` (the token mean of the group from a summed
  loss). ``reduction="mean"`` gives each rank its share of the gradient: SUM the gradients over the SP group
  (average over DP as usual); ``reduction="sum"`` lets the caller divide by a count of its own (accumulation).
* Memory: ``tile_mlp`` / ``untile_mlp``, ``enable_checkpoint_offload`` / ``offloaded_checkpoint``.

``docs/examples/own_loop.py`` uses them in a loop of its own; ``seqpar.integrations.hf`` in Hugging Face
``Trainer`` and TRL (docs/trainers.md)."""

from seqpar.models.batch import shard_batch, sp_cross_entropy, sp_global_mean
from seqpar.models.fused_loss import causal_lm_loss, sp_fused_linear_cross_entropy
from seqpar.models.linear_llama import LinearLlamaConfig, LinearLlamaForCausalLM  # registers Auto classes
from seqpar.models.offload import enable_checkpoint_offload, offloaded_checkpoint
from seqpar.models.patch import attention_calls, patch_model, patched_layout, unpatch_model
from seqpar.models.tiled_mlp import tile_mlp, untile_mlp

__all__ = ["attention_calls", "patch_model", "patched_layout", "shard_batch", "sp_cross_entropy", "unpatch_model"]
__all__ += ["LinearLlamaConfig", "LinearLlamaForCausalLM"]
__all__ += ["causal_lm_loss", "sp_fused_linear_cross_entropy", "sp_global_mean"]
__all__ += ["enable_checkpoint_offload", "offloaded_checkpoint", "tile_mlp", "untile_mlp"]  # the memory options
