"""Single-device math shared by the sequence-parallel primitives."""

from seqpar.kernels.merge import merge_all, merge_partials
from seqpar.kernels.softmax import (
    acc_dtype,
    available_backends,
    block_attention,
    block_attention_backward,
)

__all__ = [
    "acc_dtype",
    "available_backends",
    "block_attention",
    "block_attention_backward",
    "merge_all",
    "merge_partials",
]
