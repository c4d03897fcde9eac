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
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from seqpar.parallel import ParallelState
from seqpar.train import checkpoint as ckpt
from seqpar.train import faults
from seqpar.train.data import batch_at, build_dataset, load_tokenizer
from seqpar.train.engine import build_engine
from seqpar.train.logging import MetricsLogger
from seqpar.train.model import BASE_DIR, build_base_model, load_model
from seqpar.train.recipe import Recipe
from seqpar.train.validate import validate


class TrainingError(RuntimeError):
    """Training cannot go on (a NaN/inf loss): the message names the step and the checkpoint to resume from."""


def join(recipe: Recipe) -> ParallelState:
    """Process groups for this run. Under torchrun the default group is made here, with its keys prefixed by
    the restart attempt: torchrun's store outlives a failed attempt, and a restarted group would otherwise
    read the dead ranks' gloo/NCCL addresses and fail to connect."""
    from seqpar.parallel import RendezvousError, default_device_backend, group_ranks, read_launch_env

    attempt, timeout = os.environ.get("TORCHELASTIC_RESTART_COUNT"), timedelta(seconds=recipe.launch.rendezvous_timeout)
    if attempt is not None and not dist.is_initialized():
        launch = read_launch_env()
        group_ranks(launch.world_size, recipe.attention.sp_size)  # a bad layout fails before waiting on anybody
        device, backend = default_device_backend(recipe.launch.device)
        if device.type == "cuda":
            torch.cuda.set_device(launch.local_rank % torch.cuda.device_count())
        try:
            store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
            dist.init_process_group(backend, store=dist.PrefixStore(f"seqpar/attempt{attempt}", store), rank=rank,
                                    world_size=world, timeout=timeout)
        except (RuntimeError, TimeoutError, ConnectionError) as err:
            raise RendezvousError(f"rank {launch.rank} of {launch.world_size} could not join the process group at "
                                  f"{launch.master_addr}:{launch.master_port} within {timeout.total_seconds():.0f}s "
                                  f"({' '.join(str(err).split())[:200]}): check that every node's torchrun "
                                  "started and can reach that address") from err
    return ParallelState.from_env(recipe.attention.sp_size, device=recipe.launch.device, timeout=timeout)


def base_model_path(recipe: Recipe, rank: int, tokenizer: Any) -> Path:
    """The folder every rank loads: model.path, or the tiny from_config model rank 0 saves once."""
    if recipe.model.from_config is None:
        return Path(recipe.model.path)
    folder = Path(recipe.trainer.output_dir) / BASE_DIR
    if rank == 0 and not (folder / "config.json").is_file():
        build_base_model(recipe, folder, tokenizer)
    if dist.is_initialized():
        dist.barrier()
    return folder


def prepare_model(recipe: Recipe, path: Path, parallel: ParallelState) -> Any:
    from seqpar.models import patch_model
    from seqpar.models.batch import sp_group_of

    model = load_model(recipe, path)
    model.config.use_cache = False
    a = recipe.attention
    if a.name == "lasp2":  # Linear-Llama runs LASP-2 (and LASP-2H all-gather softmax layers) itself
        model.set_sequence_parallel(sp_group_of(parallel), layout="contiguous")
    else:
        patch_model(model, a.name, parallel, layout=a.layout, group_size_ratio=a.group_size_ratio,
                    num_sink_tokens=a.num_sink_tokens, ulysses_degree=a.ulysses_degree)
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


def local_batch(batch: dict, recipe: Recipe, parallel: ParallelState, device: torch.device) -> dict:
    """This rank's shard; packed documents become ``seq_lens`` (rows flattened into one sequence if B > 1)."""
    from seqpar.models import shard_batch
    from seqpar.models.patch import VARLEN, resolve_layout  # VARLEN: primitives that take cu_seqlens

    ids, docs = batch["input_ids"], batch["doc_lens"]
    full = {"input_ids": ids}
    if recipe.attention.name in VARLEN and any(len(d) > 1 for d in docs):
        # Row ends are document ends, so one row of B x L tokens with the documents marked is the same batch.
        full = {"input_ids": ids.reshape(1, -1), "seq_lens": [n for d in docs for n in d]}
    layout = "contiguous" if recipe.attention.name == "lasp2" else resolve_layout(recipe.attention.name,
                                                                                   recipe.attention.layout)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v
            for k, v in shard_batch(full, parallel, layout).items()}


def train_step(engine: Any, samples: list, recipe: Recipe, step: int, parallel: ParallelState) -> float:
    """One optimizer step over grad_accum micro-batches; returns the loss averaged over micro-batches and DP."""
    from seqpar.models import causal_lm_loss
    from seqpar.train.memory import loss_chunk

    total = 0.0
    for micro in range(recipe.trainer.grad_accum):
        batch = batch_at(samples, recipe, step, micro, parallel.dp_rank, parallel.dp_size)
        sp = local_batch(batch, recipe, parallel, parallel.device)
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
    """Mean loss over ``eval.batches`` fixed batches, model in eval mode (s2/sf use full attention)."""
    from seqpar.models import causal_lm_loss
    from seqpar.train.memory import loss_chunk

    was_training = engine.module.training
    engine.module.eval()
    losses = []
    for i in range(recipe.eval.batches):
        batch = batch_at(samples, recipe, 0, 0, parallel.dp_rank, parallel.dp_size, offset=10**6 + i)
        sp = local_batch(batch, recipe, parallel, parallel.device)
        labels = sp.pop("labels")
        losses.append(causal_lm_loss(engine, sp, labels, parallel, chunk_size=loss_chunk(recipe)).item())
    engine.module.train(was_training)
    return _dp_mean(sum(losses) / len(losses), parallel)


def train(recipe: Recipe, *, resume: bool = False) -> list[dict]:
    """Run the recipe under the launcher's environment (torchrun, srun or one process); returns the logs."""
    import deepspeed

    parallel = join(recipe)
    validate(recipe, parallel.world_size, check_paths=True)
    root = ckpt.checkpoint_root(recipe)
    latest = ckpt.latest_checkpoint(root) if resume or recipe.checkpoint.resume == "auto" else None
    if latest is not None:  # before any model is built, on every rank alike (no collective involved)
        ckpt.verify_checkpoint(latest, recipe, parallel.world_size)
    # DeepSpeed reads these; srun and single-process runs do not set them (torchrun does).
    for var, value in (("RANK", parallel.rank), ("WORLD_SIZE", parallel.world_size),
                       ("LOCAL_RANK", parallel.local_rank)):
        os.environ.setdefault(var, str(value))
    deepspeed.init_distributed(dist_backend=parallel.backend)
    _warn_accelerate_mismatch(recipe, parallel)
    torch.manual_seed(recipe.trainer.seed)
    tokenizer = load_tokenizer(recipe)
    samples = build_dataset(recipe, tokenizer)
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
    logger = MetricsLogger(recipe, rank=parallel.rank, start_step=start, resumed=latest is not None)
    tokens_per_step = recipe.data.seq_len * recipe.trainer.micro_batch * recipe.trainer.grad_accum * parallel.dp_size
    history, every = [], recipe.checkpoint.every
    for step in range(start + 1, recipe.trainer.max_steps + 1):
        t0, lr = time.perf_counter(), engine.get_lr()[0]  # the lr this step uses
        loss = train_step(engine, samples, recipe, step - 1, parallel)
        if not math.isfinite(loss):  # the same value on every rank (a mean over SP and DP): all stop together
            raise TrainingError(nan_message(loss, step, lr, ckpt.latest_checkpoint(root)))
        metrics = {"loss": loss, "lr": lr, "grad_norm": _grad_norm(engine),
                   "tokens_per_s": tokens_per_step / (time.perf_counter() - t0), "seq_len": recipe.data.seq_len,
                   "max_steps": recipe.trainer.max_steps}
        if recipe.eval.every and step % recipe.eval.every == 0:
            metrics["eval_loss"] = evaluate(engine, samples, recipe, parallel)
        logger.log(step, metrics, parallel.device)
        history.append({"step": step, "loss": loss})
        if (every and step % every == 0) or step == recipe.trainer.max_steps:
            ckpt.save_checkpoint(engine, recipe, step, rank=parallel.rank, base_model=base, tokenizer=tokenizer)
    logger.close()
    parallel.destroy()  # a clean exit: torch warns about process groups left alive
    return history


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
