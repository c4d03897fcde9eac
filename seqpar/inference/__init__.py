"""Inference-time helpers: the H2O heavy-hitter KV cache (importing registers the ``seqpar_h2o`` attention)."""

from seqpar.inference.h2o import H2O_ATTENTION, H2OCache, H2OLayer, h2o_attention

__all__ = ["H2O_ATTENTION", "H2OCache", "H2OLayer", "h2o_attention"]
