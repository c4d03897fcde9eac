"""Single-device math shared by the sequence-parallel primitives."""

from seqpar.kernels.merge import merge_all, merge_into, merge_partials, merge_sink, sink_grad
from seqpar.kernels.plan import BlockPlan, aligned_plan, cut_spans, prefix_plan, spans_plan
from seqpar.kernels.softmax import (
    acc_dtype,
    available_backends,
    block_attention,
    block_attention_backward,
    fallback_counts,
    reset_fallbacks,
)

__all__ = [
    "BlockPlan",
    "acc_dtype",
    "aligned_plan",
    "available_backends",
    "block_attention",
    "block_attention_backward",
    "cut_spans",
    "fallback_counts",
    "merge_all",
    "merge_into",
    "merge_partials",
    "merge_sink",
    "prefix_plan",
    "reset_fallbacks",
    "sink_grad",
    "spans_plan",
]
