"""Evaluation: sliding-window perplexity and passkey retrieval (``seqpar eval``).

Names resolve lazily so that ``seqpar --help`` (which imports the CLI module) does not import torch.
"""

from __future__ import annotations

import importlib


class EvalError(ValueError):
    """Bad evaluation input: every message names the argument, its value and the fix."""


_WHERE = {
    "perplexity": "seqpar.eval.perplexity",
    "sliding_window_nll": "seqpar.eval.perplexity",
    "read_text": "seqpar.eval.perplexity",
    "passkey_accuracy": "seqpar.eval.passkey",
    "passkey_prompt": "seqpar.eval.passkey",
    "load_model": "seqpar.eval.cli",
}

__all__ = ["EvalError", *sorted(_WHERE)]


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'seqpar.eval' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)


def __dir__() -> list[str]:
    return __all__
