"""The training loop: recipe -> process groups -> model (+ LoRA, + seqpar attention) -> engine -> steps.

The engine is DeepSpeed ZeRO (default) or FSDP2 (``engine: fsdp2``, seqpar/train/fsdp2.py); both follow the
contract of seqpar/train/engine.py, so the loop, the loss rule, checkpoints and preemption are shared.

Per optimizer step, each DP rank takes its global batch (all ranks of an SP group take the same one),
``shard_batch`` keeps this rank's tokens (globally shifted labels, global positions, packed-document
boundaries), the patched model runs the SP attention primitive, and each rank's summed token loss is
backpropagated scaled by ``W G / T`` (T: the target tokens of the whole step, counted before the first
forward), so that after the engine's division by G = grad_accum and average over the W ranks the gradient is
exactly that of the token mean of the whole global batch, whatever the split (``train_step``; engine.py).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from seqpar.comm import world_sum
from seqpar.kernels.host import host_read
from seqpar.parallel import ParallelState
from seqpar.train import checkpoint as ckpt
from seqpar.train import faults
from seqpar.train.data import batch_at, build_dataset, eval_batch, load_tokenizer, split_eval
from seqpar.train.engine import build_engine
from seqpar.train.logging import MetricsLogger
from seqpar.train.model import BASE_DIR, build_base_model, load_model, patch_for_training
from seqpar.train.preemption import Preemption
from seqpar.train.recipe import Recipe
from seqpar.train.validate import recipe_warnings, validate


class TrainingError(RuntimeError):
    """Training cannot go on (a NaN/inf loss): the message names the step and the checkpoint to resume from."""


def join(recipe: Recipe) -> ParallelState:
    """Process groups for this run (``ParallelState.from_env``: the restart-prefixed rendezvous under torchrun)."""
    timeout = timedelta(seconds=recipe.launch.rendezvous_timeout)
    return ParallelState.from_env(recipe.attention.sp_size, device=recipe.launch.device, timeout=timeout)


def base_model_path(recipe: Recipe, rank: int, tokenizer: Any) -> Path:
    """The folder every rank loads: model.path, or the tiny from_config model rank 0 saves once."""
    # absolute: the adapter's base_model_name_or_path (peft) must not depend on the working directory
    if recipe.model.from_config is None:
        return Path(recipe.model.path).absolute()
    folder = (Path(recipe.trainer.output_dir) / BASE_DIR).absolute()
    if rank == 0 and not (folder / "config.json").is_file():
        build_base_model(recipe, folder, tokenizer)
    if dist.is_initialized():
        dist.barrier()
    return folder


def prepare_model(recipe: Recipe, path: Path, parallel: ParallelState) -> Any:
    # FSDP2 shards float32 master weights and casts to bf16 per layer (MixedPrecisionPolicy); DeepSpeed's bf16
    # mode takes a bf16 model and keeps its own float32 copy in the optimizer.
    model = load_model(recipe, path, torch.float32 if recipe.engine == "fsdp2" else None)
    model.config.use_cache = False
    model = patch_for_training(model, recipe, parallel)
    from seqpar.train.memory import apply_memory

    note = apply_memory(model, recipe)
    if parallel.is_main:
        print(note, flush=True)
    return model


def local_batch(batch: dict, recipe: Recipe, parallel: ParallelState, device: torch.device, layout: str) -> dict:
    """This rank's shard in the patched model's ``layout``; packed documents become ``seq_lens`` (rows
    flattened into one sequence if B > 1)."""
    from seqpar.attention.registry import get_spec
    from seqpar.models import shard_batch
    from seqpar.sharding import host_bounds, remember_bounds

    ids, docs = batch["input_ids"], batch["doc_lens"]
    full = {"input_ids": ids}
    if "labels" in batch:  # SFT: -100 on every token that is not a response (unshifted, HF convention)
        full["labels"] = batch["labels"]
    if get_spec(recipe.attention.name).varlen and any(len(d) > 1 for d in docs):
        # Row ends are document ends, so one row of B x L tokens with the documents marked is the same batch.
        full = {k: v.reshape(1, -1) for k, v in full.items()}
        full["seq_lens"] = [n for d in docs for n in d]
    local = shard_batch(full, parallel, layout)
    out = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in local.items()}
    if "cu_seqlens" in out:  # keep the host ints across the copy: no layer reads the boundaries back
        remember_bounds(out["cu_seqlens"], host_bounds(local["cu_seqlens"]))
    return out


class StepLoss(NamedTuple):
    """What ``train_step`` returns, the same on every rank."""

    loss: float  # the token mean of the whole step: sum of token cross-entropies / targets
    targets: int  # T: target tokens of the step's global batch (every SP rank, DP rank and micro-step)


def train_step(engine: Any, samples: list, recipe: Recipe, step: int, parallel: ParallelState) -> StepLoss:
    """One optimizer step over grad_accum micro-batches, under the loss rule (one loss whatever the split).

    The loss of a step is ``L = (1/T) sum_{r,m} S_{r,m}``: ``S_{r,m}`` the summed token cross-entropy of rank
    r's shard of micro-batch m (``reduction="sum"``), T the number of target tokens (labels != -100 after
    ``shard_batch``'s shift and document-boundary masking) of the whole global batch. Each token weighs 1/T
    wherever it lies, so a 3-token answer no longer weighs as much as a 300-token one, and the value does not
    depend on S, D or grad_accum. T is counted on the sharded labels, before any forward (the data is known),
    and summed over the world in one all-reduce of one integer.

    Gradient: DeepSpeed makes ``g = (1/W) sum_r sum_m (1/G) d x_{r,m}`` of the backpropagated ``x_{r,m}``
    (``engine.backward`` divides by G = grad_accum, the boundary averages over all W = S x D ranks: engine.py),
    so ``x_{r,m} = (W G / T) S_{r,m}`` gives ``g = dL`` exactly. The logged loss is one more all-reduce (the
    summed S) divided by T: a float64 value, bit-identical on every rank.
    """
    from seqpar.models import causal_lm_loss, patched_layout
    from seqpar.models.batch import IGNORE_INDEX
    from seqpar.train.memory import loss_chunk

    accum, layout, device = recipe.trainer.grad_accum, patched_layout(engine), parallel.device
    micro = [local_batch(batch_at(samples, recipe, step, m, parallel.dp_rank, parallel.dp_size), recipe, parallel,
                         device, layout) for m in range(accum)]
    labels = [sp.pop("labels") for sp in micro]
    # T before any backward: every micro-batch's shard is counted here, then one all-reduce over the world
    # (each target token lies on exactly one SP rank of one DP rank). No host sync: T stays on the device.
    targets = world_sum(sum((y != IGNORE_INDEX).sum() for y in labels))
    scale = (parallel.world_size * accum) / targets.double().clamp(min=1)  # W G / T (T = 0: zero loss, no NaN)
    summed = torch.zeros((), dtype=torch.float64, device=device)
    for sp, y in zip(micro, labels):
        local = causal_lm_loss(engine, sp, y, parallel, chunk_size=loss_chunk(recipe), reduction="sum")
        if faults.nan_loss(step + 1):
            local = local * float("nan")
        engine.backward(local * scale.to(local.dtype))  # the engine divides by G and averages over W
        faults.maybe_kill("step", step + 1, parallel.rank, parallel.world_size)
        engine.step()
        summed += local.detach().double()
    total, count = host_read(torch.stack([world_sum(summed), targets.double()]), "step_loss")  # the one sync
    return StepLoss(total / max(count, 1), int(count))


@torch.no_grad()
def evaluate(engine: Any, samples: list, recipe: Recipe, parallel: ParallelState) -> float:
    """Mean loss over all target tokens of ``eval.batches`` fixed held-out batches (``samples``:
    data.eval_fraction / eval_files; each DP rank its own): ``sum of token losses / their count`` over every
    batch, SP rank and DP rank (the loss rule of ``train_step``), one all-reduce at the end. Model in eval mode
    (s2/sf use full attention)."""
    from seqpar.models import causal_lm_loss, patched_layout
    from seqpar.models.batch import IGNORE_INDEX
    from seqpar.train.memory import loss_chunk

    was_training = engine.module.training
    engine.module.eval()
    stats = torch.zeros(2, dtype=torch.float64, device=parallel.device)  # [summed token loss, target tokens]
    for i in range(recipe.eval.batches):
        batch = eval_batch(samples, recipe, i, parallel.dp_rank, parallel.dp_size)
        sp = local_batch(batch, recipe, parallel, parallel.device, patched_layout(engine))
        labels = sp.pop("labels")
        local = causal_lm_loss(engine, sp, labels, parallel, chunk_size=loss_chunk(recipe), reduction="sum")
        stats += torch.stack([local.double(), (labels != IGNORE_INDEX).sum().double()])
    engine.module.train(was_training)
    total, count = host_read(world_sum(stats), "eval_loss")
    return total / max(count, 1)


@dataclass
class Run:
    """Everything the loop needs, built once by ``setup``."""

    recipe: Recipe
    parallel: ParallelState
    engine: Any
    samples: list
    held_out: list  # evaluation samples (data.eval_fraction / data.eval_files), disjoint from samples
    tokenizer: Any
    base: Path
    root: Path
    start: int
    resumed: bool
    preempt: Preemption


def setup(recipe: Recipe, *, resume: bool = False, validated: bool = False) -> Run:
    """Process groups, data, model (+ LoRA, + seqpar attention), engine (DeepSpeed or FSDP2), resumed state.

    ``validated``: the caller (``seqpar train``) already ran ``validate(recipe, world, check_paths=True)`` and
    verified the checkpoint to resume, before the rendezvous; otherwise it is done here, once.
    """
    preempt = Preemption(recipe)  # first: a signal during start-up stops the run after its first step
    parallel = join(recipe)
    if parallel.is_main:
        for warning in recipe_warnings(recipe):
            print(f"seqpar: warning: {warning}", flush=True)
    root = ckpt.checkpoint_root(recipe)
    latest = ckpt.latest_checkpoint(root) if resume or recipe.checkpoint.resume == "auto" else None
    if not validated:
        validate(recipe, parallel.world_size, check_paths=True)
        if latest is not None:  # before any model is built, on every rank alike (no collective involved)
            ckpt.verify_checkpoint(latest, recipe, parallel.world_size)
    ckpt.refuse_earlier_run(recipe, resume, parallel)  # before anything is written: resume it or refuse
    if recipe.engine == "deepspeed":
        import deepspeed

        export_rank_env(parallel)
        deepspeed.init_distributed(dist_backend=parallel.backend)
        _warn_accelerate_mismatch(recipe, parallel)
    torch.manual_seed(recipe.trainer.seed)
    tokenizer = load_tokenizer(recipe)
    samples, held_out = split_eval(build_dataset(recipe, tokenizer), recipe, tokenizer, parallel.dp_size)
    base = base_model_path(recipe, parallel.rank, tokenizer)
    # Building the from_config base model (first run, rank 0 only) draws random numbers: reseed so LoRA's
    # initialisation, and with it the whole run, is the same on every rank and on every rerun.
    torch.manual_seed(recipe.trainer.seed)
    model = prepare_model(recipe, base, parallel)
    # FSDP2 places each rank's shards itself: the whole model is not copied to the device first
    engine = build_engine(model if recipe.engine == "fsdp2" else model.to(parallel.device), recipe,
                          parallel.device, parallel)
    facts = engine.describe() if recipe.engine == "fsdp2" else None  # collective
    if facts is not None and parallel.is_main:
        print(_describe_fsdp2(facts), flush=True)
    start = 0
    if latest is not None:
        start = ckpt.load_checkpoint(engine, latest, rank=parallel.rank, lora=recipe.lora.enabled)
        if parallel.is_main:
            saved, world = ckpt.saved_world_size(latest), parallel.world_size  # differ only under FSDP2 (DCP)
            moved = "" if saved in (None, world) else f" (written by {saved} ranks, resharded to {world})"
            print(f"resumed from {latest} at step {start}{moved}", flush=True)
    # from_pretrained returns an eval()-mode model and DeepSpeed keeps it: without this S2/SF would run their
    # eval-time full attention and gradient checkpointing (active only in training mode) would be off.
    engine.module.train()
    return Run(recipe, parallel, engine, samples, held_out, tokenizer, base, root, start, latest is not None, preempt)


def loop(run: Run) -> list[dict]:
    """Optimizer steps from ``run.start`` to ``trainer.max_steps``: log, evaluate, checkpoint; returns the logs.
    The engine is read from ``run`` each time (no local holds it): a preempted run releases it before exiting."""
    from seqpar.models import attention_calls

    recipe, parallel, samples = run.recipe, run.parallel, run.samples
    logger = MetricsLogger(recipe, rank=parallel.rank, start_step=run.start, resumed=run.resumed)
    tokens_per_step = recipe.data.seq_len * recipe.trainer.micro_batch * recipe.trainer.grad_accum * parallel.dp_size
    history, every = [], recipe.checkpoint.every
    for step in range(run.start + 1, recipe.trainer.max_steps + 1):
        t0, lr = time.perf_counter(), run.engine.get_lr()[0]  # the lr this step uses
        loss, targets = train_step(run.engine, samples, recipe, step - 1, parallel)
        if not math.isfinite(loss):  # the same value on every rank (a world token mean): all stop together
            raise TrainingError(nan_message(loss, step, lr, ckpt.latest_checkpoint(run.root)))
        # loss: the mean over the step's `targets` target tokens (the loss rule, train_step)
        metrics = {"loss": loss, "target_tokens": targets, "lr": lr, "grad_norm": _grad_norm(run.engine),
                   "tokens_per_s": tokens_per_step / (time.perf_counter() - t0), "seq_len": recipe.data.seq_len,
                   "max_steps": recipe.trainer.max_steps,
                   # which attention the layers really ran (s2/sf fall back to full in eval mode)
                   "attention_calls": attention_calls(run.engine.module, reset=True)}
        if recipe.eval.every and step % recipe.eval.every == 0:
            metrics["eval_loss"] = evaluate(run.engine, run.held_out, recipe, parallel)
            metrics["eval_attention_calls"] = attention_calls(run.engine.module, reset=True)
        logger.log(step, metrics, parallel.device)
        history.append({"step": step, "loss": loss})
        saved = (every and step % every == 0) or step == recipe.trainer.max_steps
        if saved:
            _save(run, step)
        if run.preempt.requested(parallel) and step < recipe.trainer.max_steps:  # one 4-byte all_reduce per step
            run.preempt.exit(step, parallel, None if saved else partial(_save, run, step),
                             partial(_close, run, logger))
    run.preempt.close()
    logger.close()
    return history


def _save(run: Run, step: int) -> None:
    ckpt.save_checkpoint(run.engine, run.recipe, step, rank=run.parallel.rank, base_model=run.base,
                         tokenizer=run.tokenizer)


def _close(run: Run, logger: MetricsLogger) -> None:
    logger.close()
    release(run)


def train(recipe: Recipe, *, resume: bool = False, validated: bool = False) -> list[dict]:
    """Run the recipe under the launcher's environment (torchrun, srun or one process); returns the logs."""
    run = setup(recipe, resume=resume, validated=validated)
    history = loop(run)
    release(run)
    run.parallel.destroy()  # a clean exit: torch warns about process groups left alive
    return history


def release(run: Run) -> None:
    """Drop the engine before the process groups go: FSDP2's sharded state and its DeviceMesh hold gloo work
    objects, and a gloo group destroyed only at interpreter shutdown aborts the process (SIGABRT, "terminate
    called without an active exception") when those still reference tensors."""
    import gc

    run.engine = None
    gc.collect()


def export_rank_env(parallel: ParallelState) -> None:
    """RANK, WORLD_SIZE, LOCAL_RANK for DeepSpeed; srun and single-process runs do not set them (torchrun does).
    DeepSpeed uses LOCAL_RANK as the CUDA device ordinal: under srun with one GPU bound per task
    (CUDA_VISIBLE_DEVICES of one device) SLURM_LOCALID may be 3 while the only ordinal is 0, so LOCAL_RANK is
    the index of this rank's device among the visible ones."""
    local = parallel.local_rank
    if parallel.device.type == "cuda":
        local = parallel.device.index if parallel.device.index is not None else torch.cuda.current_device()
    for var, value in (("RANK", parallel.rank), ("WORLD_SIZE", parallel.world_size), ("LOCAL_RANK", local)):
        os.environ.setdefault(var, str(value))


def nan_message(loss: float, step: int, lr: float, last_good: Path | None) -> str:
    where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written yet"
    return (f"loss is {loss} at step {step}: training stopped without saving or logging it; {where}: resume from "
            f"it (--resume or checkpoint.resume=auto) with a lower trainer.lr (now {lr:g}) or "
            "trainer.max_grad_norm, or trainer.dtype=fp32 if it was bf16")


def _warn_accelerate_mismatch(recipe: Recipe, parallel: ParallelState) -> None:
    """Under ``accelerate launch`` the recipe, not the accelerate config, sets the ZeRO stage: say so if they differ."""
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    if parallel.is_main and stage is not None and int(stage) != recipe.deepspeed.zero_stage:
        print(f"seqpar: accelerate config asks for ZeRO-{stage}, the recipe for ZeRO-{recipe.deepspeed.zero_stage}: "
              f"using the recipe's (override with deepspeed.zero_stage={stage})", flush=True)


def _describe_fsdp2(facts: dict) -> str:
    """The startup line of an FSDP2 run: the mesh and what really is sharded (tests/test_fsdp2.py reads it)."""
    import json

    return "seqpar: fsdp2 " + json.dumps(facts)


def _grad_norm(engine: Any) -> float | None:
    norm = engine.get_global_grad_norm()
    return None if norm is None else float(norm)
