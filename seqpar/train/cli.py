"""``seqpar train RECIPE [key=value ...] [--dry-run] [--resume]``.

Started by ``torchrun --nproc_per_node N -m seqpar train ...``, by ``srun`` (one task per rank, SLURM
variables), by ``accelerate launch -m seqpar train ...``, or as one plain process. ``--dry-run`` resolves
and validates the recipe and prints the process layout and the estimated peak memory per rank
(seqpar.train.planner; ``--device-memory 80GiB`` adds the longest ``data.seq_len`` that fits) without
starting any process group or reading model weights; ``--simulate`` adds the peak of one simulated step of the
real model shape on fake CUDA (seqpar.train.simulate).

Errors are one line on stderr of every rank, ``seqpar: error: <what is wrong and the fix>``, no traceback:
exit code 2 for user errors (recipe, files, process layout, checkpoint to resume), 1 for a NaN/inf loss or a
rendezvous that times out. The recipe is validated here, once, before the rendezvous.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml

from seqpar.train.recipe import Recipe, RecipeError, load_recipe


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="YAML recipe, e.g. recipes/quickstart-cpu.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides read as YAML scalars, e.g. trainer.max_steps=10 attention.sp_size=2")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved recipe and process layout, then exit")
    parser.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    parser.add_argument("--world-size", type=int, default=None,
                        help="world size to plan for in --dry-run (default: WORLD_SIZE, else launch.nnodes x "
                             "launch.nproc_per_node)")
    parser.add_argument("--device-memory", default=None, metavar="SIZE",
                        help="with --dry-run: also print the longest data.seq_len whose estimated peak fits SIZE "
                             "per rank, e.g. 80GiB")
    parser.add_argument("--simulate", action="store_true",
                        help="with --dry-run: also run one training step of the real model shape as one rank on "
                             "fake CUDA (no GPU, no weights) and print its peak device memory next to the estimate")


def planned_world(recipe: Recipe, override: int | None) -> int:
    if override is not None:
        return override
    for var in ("WORLD_SIZE", "SLURM_NTASKS"):
        if var in os.environ:
            return int(os.environ[var])
    return recipe.launch.nnodes * recipe.launch.nproc_per_node


def _engine(recipe) -> str:
    """The engine line of the plan: DeepSpeed's ZeRO stage, or FSDP2's mesh and resharding."""
    if recipe.engine == "fsdp2":
        f = recipe.fsdp2
        return (f"fsdp2 over all dp x sp ranks (reshard after forward: {str(f.reshard_after_forward).lower()}), "
                f"offload {f.offload}")
    return f"deepspeed ZeRO-{recipe.deepspeed.zero_stage}, offload {recipe.deepspeed.offload}"


def describe_plan(recipe: Recipe, world: int, config) -> str:
    from seqpar.attention.registry import resolve_layout
    from seqpar.models.families import layout_for
    from seqpar.parallel import group_ranks
    from seqpar.train.model import config_source, rope_factor

    a, t, d = recipe.attention, recipe.trainer, recipe.data
    model_type = getattr(config, "model_type", None)
    sp_groups, dp_groups = group_ranks(world, a.sp_size)
    dp = world // a.sp_size
    lines = [
        f"model facts from: {config_source(recipe)}",
        f"model_type {getattr(config, 'model_type', '?')}, heads {getattr(config, 'num_attention_heads', '?')}, "
        f"kv heads {getattr(config, 'num_key_value_heads', '?')}, "
        f"max positions {getattr(config, 'max_position_embeddings', '?')}",
        f"world {world} = {_nodes(recipe, world)}: sp_size {a.sp_size} x dp_size {dp}",
        f"SP groups (consecutive ranks): {sp_groups}",
        f"DP groups (strided ranks): {dp_groups}",
        f"attention {a.name}, layout {resolve_layout(a.name, layout_for(model_type, a.layout))}: "
        f"{d.seq_len} tokens per sequence, "
        f"{d.seq_len // a.sp_size} per rank",
        f"global batch {t.micro_batch} x {t.grad_accum} (accum) x {dp} (dp) = "
        f"{t.micro_batch * t.grad_accum * dp} sequences = {t.micro_batch * t.grad_accum * dp * d.seq_len} tokens/step",
        f"{_engine(recipe)}, dtype {t.dtype}, "
        f"{t.max_steps} steps, lr {t.lr:g} ({t.schedule}, warm-up {t.warmup_steps})",
    ]
    if a.name == "usp":
        from seqpar.attention.usp import default_ulysses_degree

        kv = getattr(config, "num_key_value_heads", None) or getattr(config, "num_attention_heads", a.sp_size)
        deg = a.ulysses_degree or default_ulysses_degree(a.sp_size, kv)
        lines.append(f"USP: Ulysses degree {deg} (all-to-all over consecutive ranks) x ring degree {a.sp_size // deg}")
    missing = [f for f in (d.files if d.source in ("files", "sft") else []) if not os.path.exists(f)]
    if missing:
        lines.append(f"note: data.files {missing} not on this machine (training there needs them)")
    if recipe.rope_scaling.type:
        lines.append(f"rope_scaling {recipe.rope_scaling.type}, factor {rope_factor(recipe, config):g}")
    if recipe.lora.enabled:
        lo = recipe.lora
        lines.append(f"LoRA r={lo.r} alpha={lo.alpha:g} on {lo.targets}; also trainable: {lo.trainable}")
    return "\n".join(lines)


def _nodes(recipe: Recipe, world: int) -> str:
    """``N node(s) x P`` for the planned world (P = launch.nproc_per_node), whatever launch.nnodes says."""
    per = recipe.launch.nproc_per_node
    return f"{world // per} node(s) x {per}" if world % per == 0 else f"{world} processes"


def launched_world() -> int:
    """The world this process was started into (torchrun's WORLD_SIZE, plain srun's SLURM_NTASKS), else 1."""
    for var in ("WORLD_SIZE", "SLURM_NTASKS"):
        if os.environ.get(var):
            return int(os.environ[var])
    return 1


def error_line(err: BaseException) -> str:
    """``seqpar: error: ...`` on one line (messages listing several problems join them with '; ')."""
    return "seqpar: error: " + " ".join(str(err).split())


def run(args: argparse.Namespace) -> int:
    """Exit codes: 0 done, 2 a user error (recipe, files, layout, checkpoint), 1 a runtime failure (NaN loss,
    rendezvous): either way one line on stderr of every rank, no traceback."""
    from seqpar.parallel import ParallelConfigError, RendezvousError
    from seqpar.train.trainer import TrainingError

    try:
        return _run(args)
    except (RecipeError, ParallelConfigError) as err:
        return report(err, 2)
    except (RendezvousError, TrainingError) as err:
        return report(err, 1)


def report(err: BaseException, code: int) -> int:
    """Print the error line and return ``code``. Under torchrun only local rank 0 prints (every rank would print
    the same line), and every rank writes it to torchrun's error file, so the launcher's failure summary
    shows this line instead of "To enable traceback see ..." under its traceback."""
    line = error_line(err)
    if "TORCHELASTIC_RUN_ID" not in os.environ or os.environ.get("LOCAL_RANK", "0") == "0":
        print(line, file=sys.stderr, flush=True)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        import json
        import time

        try:
            info = {"py_callstack": line, "timestamp": str(int(time.time()))}  # torchrun's format (errors/)
            Path(error_file).write_text(json.dumps({"message": {"message": line, "extraInfo": info}}))
        except OSError:
            pass  # the line was printed; the summary then falls back to torchrun's own text
    return code


def _run(args: argparse.Namespace) -> int:
    from seqpar.train import checkpoint as ckpt
    from seqpar.train import faults
    from seqpar.train.validate import recipe_warnings, validate

    faults.hooks()  # test-only fault variables: parsed once, a bad one is a one-line error here
    recipe = load_recipe(args.recipe, args.overrides)
    if getattr(args, "simulate", False) and not args.dry_run:
        raise RecipeError("--simulate runs a step on fake CUDA for the memory plan: add --dry-run")
    if args.dry_run:
        world = planned_world(recipe, args.world_size)
        config = validate(recipe, world)
        print("# resolved recipe")
        print(yaml.safe_dump(recipe.to_dict(), sort_keys=False).rstrip())
        print("# planned process layout (dry run: no process group started, no weights read)")
        print(describe_plan(recipe, world, config))
        from seqpar.train.planner import describe_memory

        print(describe_memory(recipe, config, world, args.device_memory))
        if args.simulate:
            from seqpar.train.simulate import describe_simulated

            print(describe_simulated(recipe, config, world, args.device_memory), flush=True)
        for warning in recipe_warnings(recipe):
            print(f"# warning: {warning}")
        return 0
    # Fail fast, before the rendezvous and on every rank alike: the recipe, its files, the checkpoint to resume.
    world = launched_world()
    validate(recipe, world, check_paths=True)
    from seqpar.train.quiet import quiet_libraries

    quiet_libraries(recipe.launch.device)
    resume = args.resume or recipe.checkpoint.resume == "auto"
    latest = ckpt.latest_checkpoint(ckpt.checkpoint_root(recipe)) if resume else None
    if latest is not None:
        ckpt.verify_checkpoint(latest, recipe, world)
    from seqpar.train import trainer

    trainer.train(recipe, resume=args.resume, validated=True)  # checked above, once
    return 0
