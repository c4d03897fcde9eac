"""``seqpar merge-lora CHECKPOINT OUT_DIR``: fold a LoRA checkpoint into a plain transformers model.

W = W0 + (alpha / r) B A for every adapted projection; the trained embeddings and norms (LongLoRA+) replace
the base ones; the recipe's RoPE scaling is written into the saved config. The result loads with
``AutoModelForCausalLM.from_pretrained(OUT_DIR)`` (safetensors) and needs neither peft nor seqpar.
Works from checkpoints saved under any ZeRO stage: the adapter was gathered before it was written.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

from seqpar.train.checkpoint import MARKER, latest_checkpoint
from seqpar.train.recipe import RecipeError


def find_checkpoint(path: Path) -> Path:
    """A complete checkpoint folder: ``path`` itself, or the newest under it (a run or checkpoints folder)."""
    if (path / MARKER).is_file():
        return path
    for root in (path, path / "checkpoints"):
        found = latest_checkpoint(root)
        if found is not None:
            return found
    raise RecipeError(f"CHECKPOINT={str(path)!r} holds no complete checkpoint (a step-* folder with {MARKER}): "
                      "pass a checkpoint folder or the run's output_dir")


def merge_lora(checkpoint: str | Path, out_dir: str | Path, *, dtype: torch.dtype = torch.float32) -> Path:
    """Write the merged model (and tokenizer) to ``out_dir``; returns it."""
    from seqpar.train.trained import load_trained

    ckpt, out = find_checkpoint(Path(checkpoint)), Path(out_dir)
    if out.exists() and not out.is_dir():
        raise RecipeError(f"OUT_DIR={str(out)!r} is an existing file: pass a folder path (new or a model folder "
                          "to overwrite)")
    model = load_trained(ckpt, dtype=dtype)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a file where a parent folder should be
        raise RecipeError(f"OUT_DIR={str(out)!r} cannot be created ({err.strerror}): pass a folder path") from err
    model.save_pretrained(out, safe_serialization=True)
    tok = ckpt / "tokenizer"
    if tok.is_dir():
        for f in tok.iterdir():
            shutil.copy2(f, out / f.name)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a checkpoint folder (step-*) or a run's output_dir (newest checkpoint)")
    parser.add_argument("out_dir", help="where to write the merged transformers model")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="dtype of the saved weights")


def run(args: argparse.Namespace) -> int:
    try:
        out = merge_lora(args.checkpoint, args.out_dir,
                         dtype=torch.bfloat16 if args.dtype == "bf16" else torch.float32)
    except RecipeError as err:
        print("seqpar: error: " + " ".join(str(err).split()), file=sys.stderr)
        return 2
    print(f"merged model written to {out}")
    return 0
