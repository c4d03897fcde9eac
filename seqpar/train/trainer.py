"""The training loop: recipe -> process groups -> model (+ LoRA, + seqpar attention) -> DeepSpeed -> steps.

Per optimizer step, each DP rank takes its global batch (all ranks of an SP group take the same one),
``shard_batch`` keeps this rank's tokens (globally shifted labels, global positions, packed-document
boundaries), the patched model runs the SP attention primitive, ``sp_cross_entropy`` gives the mean over
the whole sequence, and ``S x loss`` is backpropagated so that DeepSpeed's average over all ranks is the
exact data-parallel gradient (seqpar/train/engine.py explains the factor).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from seqpar.parallel import ParallelState
from seqpar.train import checkpoint as ckpt
from seqpar.train import faults
from seqpar.train.data import batch_at, build_dataset, eval_batch, load_tokenizer, split_eval
from seqpar.train.engine import build_engine
from seqpar.train.logging import MetricsLogger
from seqpar.train.model import BASE_DIR, build_base_model, load_model
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
    from seqpar.models import patch_model

    model = load_model(recipe, path)
    model.config.use_cache = False
    a = recipe.attention
    patch_model(model, a.name, parallel, layout=a.layout, group_size_ratio=a.group_size_ratio,
                num_sink_tokens=a.num_sink_tokens, ulysses_degree=a.ulysses_degree, s2_wrap=a.s2_wrap)
    if recipe.trainer.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if recipe.lora.enabled:
        from seqpar.train.lora import apply_lora

        model = apply_lora(model, recipe.lora)
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
    if get_spec(recipe.attention.name).varlen and any(len(d) > 1 for d in docs):
        # Row ends are document ends, so one row of B x L tokens with the documents marked is the same batch.
        full = {"input_ids": ids.reshape(1, -1), "seq_lens": [n for d in docs for n in d]}
    local = shard_batch(full, parallel, layout)
    out = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in local.items()}
    if "cu_seqlens" in out:  # keep the host ints across the copy: no layer reads the boundaries back
        remember_bounds(out["cu_seqlens"], host_bounds(local["cu_seqlens"]))
    return out


def train_step(engine: Any, samples: list, recipe: Recipe, step: int, parallel: ParallelState) -> float:
    """One optimizer step over grad_accum micro-batches; returns the loss averaged over micro-batches and DP."""
    from seqpar.models import causal_lm_loss, patched_layout
    from seqpar.train.memory import loss_chunk

    total = 0.0
    for micro in range(recipe.trainer.grad_accum):
        batch = batch_at(samples, recipe, step, micro, parallel.dp_rank, parallel.dp_size)
        sp = local_batch(batch, recipe, parallel, parallel.device, patched_layout(engine))
        labels = sp.pop("labels")
        loss = causal_lm_loss(engine, sp, labels, parallel, chunk_size=loss_chunk(recipe))
        if faults.nan_loss(step + 1):
            loss = loss * float("nan")
        engine.backward(loss * parallel.sp_size)  # DeepSpeed divides by W; SP needs a sum (see engine.py)
        faults.maybe_kill("step", step + 1, parallel.rank, parallel.world_size)
        engine.step()
        total += loss.item()
    return _dp_mean(total / recipe.trainer.grad_accum, parallel)


def _dp_mean(value: float, parallel: ParallelState) -> float:
    if parallel.dp_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=parallel.device)
    dist.all_reduce(t, group=parallel.dp_group)
    return t.item() / parallel.dp_size


@torch.no_grad()
def evaluate(engine: Any, samples: list, recipe: Recipe, parallel: ParallelState) -> float:
    """Mean loss over ``eval.batches`` fixed held-out batches (``samples``: data.eval_fraction / eval_files; each
    DP rank its own), model in eval mode (s2/sf use full attention)."""
    from seqpar.models import causal_lm_loss, patched_layout
    from seqpar.train.memory import loss_chunk

    was_training = engine.module.training
    engine.module.eval()
    losses = []
    for i in range(recipe.eval.batches):
        batch = eval_batch(samples, recipe, i, parallel.dp_rank, parallel.dp_size)
        sp = local_batch(batch, recipe, parallel, parallel.device, patched_layout(engine))
        labels = sp.pop("labels")
        losses.append(causal_lm_loss(engine, sp, labels, parallel, chunk_size=loss_chunk(recipe)).item())
    engine.module.train(was_training)
    return _dp_mean(sum(losses) / len(losses), parallel)


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
    """Process groups, data, model (+ LoRA, + seqpar attention), DeepSpeed engine, resumed state.

    ``validated``: the caller (``seqpar train``) already ran ``validate(recipe, world, check_paths=True)`` and
    verified the checkpoint to resume, before the rendezvous; otherwise it is done here, once.
    """
    import deepspeed

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
    engine = build_engine(model.to(parallel.device), recipe, parallel.device)
    start = 0
    if latest is not None:
        start = ckpt.load_checkpoint(engine, latest, rank=parallel.rank, lora=recipe.lora.enabled)
        if parallel.is_main:
            print(f"resumed from {latest} at step {start}", flush=True)
    # from_pretrained returns an eval()-mode model and DeepSpeed keeps it: without this S2/SF would run their
    # eval-time full attention and gradient checkpointing (active only in training mode) would be off.
    engine.module.train()
    return Run(recipe, parallel, engine, samples, held_out, tokenizer, base, root, start, latest is not None, preempt)


def loop(run: Run) -> list[dict]:
    """Optimizer steps from ``run.start`` to ``trainer.max_steps``: log, evaluate, checkpoint; returns the logs."""
    from seqpar.models import attention_calls

    recipe, parallel, engine, samples = run.recipe, run.parallel, run.engine, run.samples
    logger = MetricsLogger(recipe, rank=parallel.rank, start_step=run.start, resumed=run.resumed)
    tokens_per_step = recipe.data.seq_len * recipe.trainer.micro_batch * recipe.trainer.grad_accum * parallel.dp_size
    history, every = [], recipe.checkpoint.every
    for step in range(run.start + 1, recipe.trainer.max_steps + 1):
        t0, lr = time.perf_counter(), engine.get_lr()[0]  # the lr this step uses
        loss = train_step(engine, samples, recipe, step - 1, parallel)
        if not math.isfinite(loss):  # the same value on every rank (a mean over SP and DP): all stop together
            raise TrainingError(nan_message(loss, step, lr, ckpt.latest_checkpoint(run.root)))
        metrics = {"loss": loss, "lr": lr, "grad_norm": _grad_norm(engine),
                   "tokens_per_s": tokens_per_step / (time.perf_counter() - t0), "seq_len": recipe.data.seq_len,
                   "max_steps": recipe.trainer.max_steps,
                   # which attention the layers really ran (s2/sf fall back to full in eval mode)
                   "attention_calls": attention_calls(engine.module, reset=True)}
        if recipe.eval.every and step % recipe.eval.every == 0:
            metrics["eval_loss"] = evaluate(engine, run.held_out, recipe, parallel)
            metrics["eval_attention_calls"] = attention_calls(engine.module, reset=True)
        logger.log(step, metrics, parallel.device)
        history.append({"step": step, "loss": loss})
        saved = (every and step % every == 0) or step == recipe.trainer.max_steps
        if saved:
            ckpt.save_checkpoint(engine, recipe, step, rank=parallel.rank, base_model=run.base,
                                 tokenizer=run.tokenizer)
        if run.preempt.requested(parallel) and step < recipe.trainer.max_steps:  # one 4-byte all_reduce per step
            run.preempt.exit(step, parallel, None if saved else partial(
                ckpt.save_checkpoint, engine, recipe, step, rank=parallel.rank, base_model=run.base,
                tokenizer=run.tokenizer), logger.close)
    run.preempt.close()
    logger.close()
    return history


def train(recipe: Recipe, *, resume: bool = False, validated: bool = False) -> list[dict]:
    """Run the recipe under the launcher's environment (torchrun, srun or one process); returns the logs."""
    run = setup(recipe, resume=resume, validated=validated)
    history = loop(run)
    run.parallel.destroy()  # a clean exit: torch warns about process groups left alive
    return history


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


def _grad_norm(engine: Any) -> float | None:
    norm = engine.get_global_grad_norm()
    return None if norm is None else float(norm)
