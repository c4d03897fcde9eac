"""The model a run trained, rebuilt from one of its checkpoints: the base model with the run's RoPE scaling (and
extended context), the LoRA adapter folded in (or the full fine-tuned weights). ``seqpar merge-lora`` saves it;
``seqpar eval`` evaluates it from a run folder, a checkpoint or the checkpoint's ``adapter/`` folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from seqpar.train.checkpoint import MARKER, latest_checkpoint
from seqpar.train.recipe import RecipeError, load_recipe


def checkpoint_of(path: Path) -> Path | None:
    """The checkpoint ``path`` stands for: a step-* folder itself, its adapter/ or model/ folder, or the newest
    complete checkpoint of a run folder (or of its checkpoints/ folder); None when it is none of these."""
    if (path / MARKER).is_file():
        return path
    if path.name in ("adapter", "model") and (path.parent / MARKER).is_file():
        return path.parent
    for root in (path, path / "checkpoints"):
        found = latest_checkpoint(root)
        if found is not None:
            return found
    return None


def load_trained(ckpt: Path, *, dtype: torch.dtype = torch.float32) -> Any:
    """The trained causal LM of checkpoint ``ckpt`` (merged, plain transformers, on CPU, in ``dtype``)."""
    from seqpar.train.model import load_model

    if (ckpt / "model").is_dir():  # full fine-tuning: saved from the scaled model, its config says the scaling
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(ckpt / "model", dtype=torch.float32)
    elif (ckpt / "adapter").is_dir():
        from peft import PeftModel

        recipe = load_recipe(ckpt / "recipe.yaml")
        recipe.trainer.dtype = "fp32"  # merge in float32; cast at the end
        base = Path(json.loads((ckpt / "trainer_state.json").read_text())["base_model"])
        if not base.is_dir():
            raise RecipeError(f"checkpoint {ckpt} was trained on the base model {str(base)!r}, which is not on this "
                              "machine: copy it there (trainer_state.json names it)")
        model = load_model(recipe, base)  # the run's RoPE scaling and extended context
        model = PeftModel.from_pretrained(model, ckpt / "adapter").merge_and_unload()
    else:
        raise RecipeError(f"{ckpt} has neither adapter/ nor model/: it was not written by seqpar train")
    model.config.use_cache = True
    return model.to(dtype)
