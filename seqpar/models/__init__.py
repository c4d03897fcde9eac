"""Integration with model code: seqpar attention inside Hugging Face models, SP batches and loss."""

from seqpar.models.batch import shard_batch, sp_cross_entropy
from seqpar.models.fused_loss import causal_lm_loss, sp_fused_linear_cross_entropy
from seqpar.models.linear_llama import LinearLlamaConfig, LinearLlamaForCausalLM  # registers Auto classes
from seqpar.models.patch import attention_calls, patch_model, patched_layout, unpatch_model

__all__ = ["attention_calls", "patch_model", "patched_layout", "shard_batch", "sp_cross_entropy", "unpatch_model"]
__all__ += ["LinearLlamaConfig", "LinearLlamaForCausalLM"]
__all__ += ["causal_lm_loss", "sp_fused_linear_cross_entropy"]
