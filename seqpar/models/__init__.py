"""Integration with model code: seqpar attention inside Hugging Face models, SP batches and loss, and the
memory options (tiled MLP, checkpoint offload); ``docs/examples/own_loop.py`` uses them in a loop of its own."""

from seqpar.models.batch import shard_batch, sp_cross_entropy
from seqpar.models.fused_loss import causal_lm_loss, sp_fused_linear_cross_entropy
from seqpar.models.linear_llama import LinearLlamaConfig, LinearLlamaForCausalLM  # registers Auto classes
from seqpar.models.offload import enable_checkpoint_offload, offloaded_checkpoint
from seqpar.models.patch import attention_calls, patch_model, patched_layout, unpatch_model
from seqpar.models.tiled_mlp import tile_mlp, untile_mlp

__all__ = ["attention_calls", "patch_model", "patched_layout", "shard_batch", "sp_cross_entropy", "unpatch_model"]
__all__ += ["LinearLlamaConfig", "LinearLlamaForCausalLM"]
__all__ += ["causal_lm_loss", "sp_fused_linear_cross_entropy"]
__all__ += ["enable_checkpoint_offload", "offloaded_checkpoint", "tile_mlp", "untile_mlp"]  # the memory options
