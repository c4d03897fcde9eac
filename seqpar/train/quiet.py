"""Known library noise, filtered once per process before training: each rank would otherwise print about ten
lines (deprecation warnings from code we do not own, progress bars per rank, DeepSpeed's CPU fallback notice).
Only these exact messages are filtered; every other warning still shows.
"""

from __future__ import annotations

import os
import warnings

# (message regex, category): deprecations inside transformers / torch.distributed, raised on every step or layer
KNOWN_WARNINGS = (
    (r".*`is_gradient_checkpointing` is deprecated", FutureWarning),  # transformers' own gradient-checkpoint check
    (r".*`torch.distributed.all_gather_into_tensor` is deprecated", FutureWarning),  # DeepSpeed ZeRO's all-gather
    (r".*`torch.distributed._all_gather_base` is a private function", UserWarning),
    (r".*`torch.distributed._reduce_scatter_base` is a private function", UserWarning),
)


def quiet_libraries(device: str | None) -> None:
    """Filter the known warnings and per-rank progress bars; tell DeepSpeed it runs on CPU when it does."""
    for message, category in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" / "Writing model shards" bars on every rank
    import torch

    if device == "cpu" or not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # else: "Setting accelerator to CPU ..." on every rank
