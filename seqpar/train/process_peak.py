"""The peak memory of a whole ``seqpar train`` process on CPU, to check the planner against (issue 26).

    torchrun --nproc_per_node 2 -m seqpar.train.process_peak OUT.json RECIPE [key=value ...]

Each rank imports what training imports (torch, transformers' model classes, DeepSpeed, seqpar's models and
trainer) and only then reads its resident set size: code and interpreter state are host memory on a GPU too,
never device memory, so they are not what the planner estimates. Then it runs ``seqpar.train.trainer.train``
exactly as ``seqpar train`` does (process groups, data, model build and load, DeepSpeed engine, steps) and
reads the RSS high-water mark (``ru_maxrss``) when the first checkpoint is about to be written (the training
steps' peak: saving is host memory on a GPU) and at the end. The numbers above the baseline go to OUT.json,
one entry per rank. :func:`environ` tells glibc to return freed blocks at once (no trim threshold, a fixed
mmap threshold), so the high-water mark is live memory, not the allocator's caches.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from seqpar.bench.measure import GLIBC_RETURNS_FREED, peak_rss_bytes, rss_bytes

# The bench's setting (seqpar.bench.measure) plus few arenas: DeepSpeed's and gloo's threads would each get one.
MALLOC = {**GLIBC_RETURNS_FREED, "MALLOC_ARENA_MAX": "2"}


def environ(base: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of ``base`` (default ``os.environ``) with the glibc settings that make RSS track live memory."""
    return {**(os.environ if base is None else base), **MALLOC}


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: python -m seqpar.train.process_peak OUT.json RECIPE [key=value ...]", file=sys.stderr)
        return 2
    out, recipe_path, overrides = Path(argv[0]), argv[1], argv[2:]
    # What training imports, imported before the baseline (host code, not device memory).
    import deepspeed  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM  # noqa: F401

    import seqpar.models  # noqa: F401
    from seqpar.train import checkpoint, trainer
    from seqpar.train.recipe import load_recipe

    recipe = load_recipe(recipe_path, overrides)
    model_type = (recipe.model.from_config or recipe.model.config or {}).get("model_type")
    if model_type:  # the modeling module transformers imports lazily on the first build
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as names

        module = f"transformers.models.{model_type}.modeling_{model_type}"
        if model_type in names:
            __import__(module)
    base = rss_bytes()
    marks: dict[str, int] = {}
    save = checkpoint.save_checkpoint

    def save_marked(*args, **kwargs):
        marks.setdefault("steps", peak_rss_bytes())
        return save(*args, **kwargs)

    trainer.ckpt.save_checkpoint = save_marked
    trainer.train(recipe)
    marks.setdefault("steps", peak_rss_bytes())
    marks["process"] = peak_rss_bytes()
    rank = int(os.environ.get("RANK", "0"))
    record = {"rank": rank, "baseline_rss": base, **{f"{k}_peak": v - base for k, v in marks.items()}}
    part = out.with_name(f"{out.name}.rank{rank}")
    part.write_text(json.dumps(record))
    return 0


def collect(out: Path, world: int) -> list[dict]:
    """The per-rank records a run left next to ``out`` (rank order)."""
    return [json.loads(out.with_name(f"{out.name}.rank{r}").read_text()) for r in range(world)]


def measure(recipe: str | Path, overrides: list[str], nproc: int, folder: Path, *, timeout: float = 300) -> list[dict]:
    """Run ``recipe`` under torchrun with ``nproc`` CPU processes (one plain process for 1), its output under
    ``folder``, and return each rank's record (``steps_peak``: bytes above the baseline up to the first
    checkpoint; ``process_peak``: to the end). Raises RuntimeError with the run's last lines if it fails."""
    import subprocess

    from seqpar.launcher import free_port

    folder.mkdir(parents=True, exist_ok=True)
    out = folder / "peak.json"
    env = environ({**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2])})
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    args = ["-m", "seqpar.train.process_peak", str(out), str(recipe), f"trainer.output_dir={folder / 'run'}",
            "logging.wandb=false", "checkpoint.every=0", *overrides]
    if nproc > 1:
        args = ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(free_port()),
                *args]
    done = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=folder)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return collect(out, nproc)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
