"""Inference: the H2O heavy-hitter KV cache (``seqpar.inference.h2o``; importing it, or taking any of its names
from here, registers the ``seqpar_h2o`` attention) and ``seqpar generate`` (``seqpar.inference.generate``).

Names resolve lazily so that building the ``seqpar`` parser (which imports ``seqpar.inference.generate``) does
not import transformers.
"""

from __future__ import annotations

import importlib

_H2O = ("CACHE_KWARG", "H2O_ATTENTION", "H2OCache", "H2OLayer", "h2o_attention", "kv_footprint", "new_cache",
        "use_h2o_attention")
__all__ = [*_H2O, "generate"]


def __getattr__(name: str):
    if name in _H2O:
        return getattr(importlib.import_module("seqpar.inference.h2o"), name)
    if name == "generate":
        return importlib.import_module("seqpar.inference.generate")
    raise AttributeError(f"module 'seqpar.inference' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
