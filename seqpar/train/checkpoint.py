"""Atomic checkpoints: ``<dir>/step-00000010/`` appears only when complete.

Layout of one checkpoint::

    step-00000010/
      deepspeed/        engine.save_checkpoint: model + optimizer + LR-scheduler state (ZeRO partitions)
      adapter/          peft save_pretrained (safetensors): LoRA + trainable embed/norm   (LoRA runs)
      model/            plain transformers save_pretrained (safetensors)                  (full fine-tuning)
      rng/rank{r}.pt    python / torch / CUDA RNG states of every rank
      recipe.yaml       the resolved recipe
      trainer_state.json  step and data position
      COMPLETE          written last

Every rank writes into ``.tmp-step-.../``; after a barrier rank 0 writes the marker and renames the folder
(an atomic rename on one filesystem). A crash mid-save leaves only a ``.tmp-`` folder, which is never
mistaken for a checkpoint and is removed by the next save.
"""

from __future__ import annotations

import json
import random
import shutil
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from seqpar.train.recipe import Recipe, save_recipe

MARKER = "COMPLETE"


def checkpoint_root(recipe: Recipe) -> Path:
    return Path(recipe.checkpoint.dir or Path(recipe.trainer.output_dir) / "checkpoints")


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / MARKER).is_file())


def latest_checkpoint(root: Path) -> Path | None:
    done = complete_checkpoints(root)
    return done[-1] if done else None


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def export_weights(module: Any, folder: Path, *, zero_stage: int, rank: int) -> None:
    """Weights out of DeepSpeed as safetensors: the peft adapter (LoRA + extras) or the whole model.

    Collective under ZeRO-3: parameters are partitioned there, so they are gathered first (saving without
    gathering writes an empty adapter, a known ZeRO-3 pitfall).
    """
    import deepspeed

    is_peft = hasattr(module, "peft_config")
    params = [p for p in module.parameters() if p.requires_grad or not is_peft]
    gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if zero_stage == 3 else nullcontext()
    with gather:
        if rank == 0:
            if is_peft:
                module.save_pretrained(folder / "adapter", safe_serialization=True)
            else:
                state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
                module.save_pretrained(folder / "model", state_dict=state, safe_serialization=True)


def save_checkpoint(engine: Any, recipe: Recipe, step: int, *, rank: int, base_model: Path,
                    tokenizer: Any = None) -> Path:
    """Collective: every rank calls it. Returns the final folder."""
    root = checkpoint_root(recipe)
    tmp, final = root / f".tmp-step-{step:08d}", root / f"step-{step:08d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "rng").mkdir(parents=True)
    _barrier()
    lora = recipe.lora.enabled
    engine.save_checkpoint(str(tmp / "deepspeed"), tag="state", exclude_frozen_parameters=lora)
    torch.save(_rng_state(), tmp / "rng" / f"rank{rank}.pt")
    export_weights(engine.module, tmp, zero_stage=recipe.deepspeed.zero_stage, rank=rank)
    _barrier()
    if rank == 0:
        save_recipe(recipe, tmp / "recipe.yaml")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / "tokenizer")
        (tmp / "trainer_state.json").write_text(json.dumps(
            {"step": step, "data_position": step, "base_model": str(Path(base_model).resolve())}))
        (tmp / MARKER).write_text("ok\n")  # last: its presence means everything above is on disk
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in complete_checkpoints(root)[: -recipe.checkpoint.keep]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in root.glob(".tmp-step-*"):
            shutil.rmtree(stale, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(engine: Any, folder: Path, *, rank: int, lora: bool) -> int:
    """Restore model, optimizer, scheduler and RNG states; return the step to continue from."""
    engine.load_checkpoint(str(folder / "deepspeed"), tag="state", load_module_strict=not lora)
    rng = folder / "rng" / f"rank{rank}.pt"
    if rng.is_file():  # absent when resuming on a different world size
        _set_rng_state(torch.load(rng, weights_only=False))
    return int(json.loads((folder / "trainer_state.json").read_text())["step"])
