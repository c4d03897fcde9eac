"""One torchrun launch of 2 gloo ranks (SP = 2) for tests/test_hf_trainer.py. First ``seqpar train``'s own
code (``setup`` + ``loop``: what the CLI runs, DeepSpeed ZeRO-2 included) trains the SFT recipe, then the same
training (recipe, data order, base model, LoRA initialisation, AdamW and schedule) runs through ``SeqparTrainer``
and (with TRL) ``SeqparSFTTrainer``, plus the controls and bad inputs; rank 0 writes what it measured to
``OUT/results.json``. One launch: the imports (transformers' Trainer, DeepSpeed) are paid once.

    python -m torch.distributed.run --nproc_per_node 2 -m tests.hf_trainer_harness OUT OVERRIDES...
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch


def features_of(batch: dict) -> list[dict]:
    """The rows of a ``seqpar.train.data`` batch as Trainer samples (seq_lengths: the packed documents)."""
    return [{"input_ids": batch["input_ids"][i].tolist(), "labels": batch["labels"][i].tolist(),
             "seq_lengths": list(batch["doc_lens"][i])} for i in range(batch["input_ids"].shape[0])]


def main(out: Path, overrides: list[str]) -> None:
    start = time.perf_counter()
    import torch.distributed as dist
    from transformers import Trainer, TrainingArguments

    from seqpar.integrations.hf import NO_REDUCTION, SeqparTrainer, SPDataCollator
    from seqpar.models import causal_lm_loss, patched_layout
    from seqpar.models.batch import IGNORE_INDEX, sp_global_mean
    from seqpar.sharding import shard
    from seqpar.train.data import batch_at, eval_batch
    from seqpar.train.engine import lr_lambda
    from seqpar.train.model import BASE_DIR
    from seqpar.train.recipe import load_recipe
    from seqpar.train.trainer import loop, prepare_model, setup
    from tests.test_recipe import ROOT

    recipe = load_recipe(ROOT / "recipes" / "sft-cpu.yaml", [*overrides, f"trainer.output_dir={out / 'seqpar'}"])
    t = recipe.trainer
    run = setup(recipe)  # seqpar train: process groups, data, model, DeepSpeed engine
    loop(run)
    parallel = run.parallel
    metrics = (out / "seqpar" / "metrics.jsonl").read_text().splitlines() if parallel.is_main else []  # rank 0's
    reference = [json.loads(line) for line in metrics]
    tokenizer, samples, held = run.tokenizer, run.samples, run.held_out  # what seqpar train trained and held out
    run.engine = None
    # the exact order seqpar train read: micro-step m of step s is batch_at(s, m); the Trainer reads the list in order
    train = [f for s in range(t.max_steps) for m in range(t.grad_accum)
             for f in features_of(batch_at(samples, recipe, s, m, 0, 1))]
    evals = [f for i in range(recipe.eval.batches) for f in features_of(eval_batch(held, recipe, i, 0, 1))]
    base = out / "seqpar" / BASE_DIR
    results: dict = {"seqpar": {key: [r.get(key) for r in reference] for key in ("loss", "grad_norm", "eval_loss")},
                     "seconds": {"seqpar": time.perf_counter() - start}}

    def lap(name: str) -> None:
        results["seconds"][name] = time.perf_counter() - start

    def model_and_optimizers():
        torch.manual_seed(t.seed)  # as seqpar train's setup: the same LoRA initialisation
        model = prepare_model(recipe, base, parallel)  # patch_model + peft LoRA, as seqpar train builds it
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=t.lr, betas=tuple(t.betas),
                                eps=1e-8, weight_decay=t.weight_decay)  # DeepSpeed's AdamW with torch_adam
        return model, (opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(recipe)))

    def arguments(name: str, steps: int = t.max_steps, cls=TrainingArguments, **extra) -> TrainingArguments:
        return cls(output_dir=str(out / name), per_device_train_batch_size=t.micro_batch,
                   per_device_eval_batch_size=t.micro_batch, gradient_accumulation_steps=t.grad_accum,
                   max_steps=steps, max_grad_norm=t.max_grad_norm, logging_steps=1, save_strategy="no",
                   report_to=[], use_cpu=True, disable_tqdm=True, train_sampling_strategy="sequential", **extra)

    def history(trainer) -> dict:
        logs = [r for r in trainer.state.log_history if "loss" in r and "grad_norm" in r]
        return {"loss": [r["loss"] for r in logs], "grad_norm": [r["grad_norm"] for r in logs],
                "lr": [r.get("learning_rate") for r in logs]}

    # 1. SeqparTrainer: 5 steps, then eval on seqpar train's held-out batches (same weights as its step-5 eval)
    model, optimizers = model_and_optimizers()
    trainer = SeqparTrainer(model=model, args=arguments("hf"), train_dataset=train, optimizers=optimizers)
    trainer.train()
    results["hf"] = history(trainer)
    results["hf"]["eval_loss"] = trainer.evaluate(eval_dataset=evals)["eval_loss"]

    lap('trainer')
    # 2. The labels must be shifted over the whole sequence: shifting each shard alone changes the loss
    collator, group, layout = trainer.data_collator, parallel.sp_group, patched_layout(model)
    every = [{k: v for k, v in f.items() if k != "labels"} for f in train[: t.micro_batch]]  # all tokens targets
    batch = collator(every)
    sp = {k: v for k, v in batch.items() if k in ("input_ids", "position_ids", "cu_seqlens")}
    local_labels = shard(collator.full_batch(every)["labels"], group=group, dim=1, layout=layout)
    naive = torch.full_like(local_labels, IGNORE_INDEX)
    naive[:, :-1] = local_labels[:, 1:]  # each shard shifted alone, as the model's own loss would
    model.eval()
    with torch.no_grad():
        for name, labels in (("global_shift_loss", batch["labels"]), ("shard_shift_loss", naive)):
            local = causal_lm_loss(model, sp, labels, group, reduction="sum")
            results[name] = sp_global_mean(local, (labels != IGNORE_INDEX).sum(), group).item()

    # A shard with no target token: targets only in the first 100 tokens (zigzag: all on SP rank 0)
    few = [{**f, "labels": [y if i < 100 else IGNORE_INDEX for i, y in enumerate(f["labels"])]} if j == 0 else
           {**f, "labels": [IGNORE_INDEX] * len(f["labels"])} for j, f in enumerate(train[: t.micro_batch])]
    batch = collator(few)
    count = (batch["labels"] != IGNORE_INDEX).sum()
    total = count.clone()
    dist.all_reduce(total)
    model.train()
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch, num_items_in_batch=total)
        model.eval()
        mean = trainer.compute_loss(model, batch)  # eval: the SP group's token mean, on every rank
        trainer.loss_chunk_size = 100  # the fused head + loss over 100-token tiles: no logits
        results["fused_minus_full"] = trainer.compute_loss(model, batch).item() - mean.item()
        trainer.loss_chunk_size = None
    shares = [None, None]
    dist.all_gather_object(shares, (int(count), loss.item(), mean.item()))
    results["few_targets"] = shares

    lap('controls')
    # 3. Without the SP reduction (each rank's share averaged by DDP instead of summed): half the gradient
    class Averaged(SeqparTrainer):
        def compute_loss(self, *args, **kwargs):
            return super().compute_loss(*args, **kwargs) / self.sp_size

    model, optimizers = model_and_optimizers()
    averaged = Averaged(model=model, args=arguments("averaged", steps=1), train_dataset=train, optimizers=optimizers)
    averaged.train()
    results["averaged"] = history(averaged)

    lap('averaged')
    # 4. TRL's SFTTrainer (padding-free: TRL lays the rows end to end, documents from its position ids)
    try:
        from trl import SFTConfig

        from seqpar.integrations.hf import SeqparSFTTrainer
    except ImportError as err:
        results["trl"] = f"skipped: {err}"
    else:
        from datasets import Dataset

        model, optimizers = model_and_optimizers()
        config = arguments("trl", cls=SFTConfig, padding_free=True, max_length=None, packing=False,
                           bf16=False)  # SFTConfig defaults to bf16 autocast; seqpar train's recipe is fp32
        sft = SeqparSFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(train),
                               processing_class=tokenizer, optimizers=optimizers)
        sft.train()
        results["trl"] = history(sft)

    lap('trl')
    # 5. Bad input: SP batches in a plain Trainer, whose DDP would average the SP ranks' partial gradients
    model, optimizers = model_and_optimizers()
    plain = Trainer(model=model, args=arguments("plain", steps=1), train_dataset=train, optimizers=optimizers,
                    data_collator=SPDataCollator(parallel, patched_layout(model)))
    try:
        plain.train()
        results["plain"] = "trained"
    except ValueError as err:
        results["plain"] = str(err)
        assert str(err) == NO_REDUCTION
    # SP ranks given different batches (what accelerate's default dealing would do): refused on every rank
    rank = parallel.sp_rank
    try:
        averaged.get_batch_samples(iter([collator(train[rank * t.micro_batch:(rank + 1) * t.micro_batch])]), 1,
                                   parallel.device)
        results["mismatch"] = "accepted"
    except ValueError as err:
        results["mismatch"] = str(err)
    # DDP over the DP group only (the SP ranks' gradients never meet): the W / T scaling would be wrong
    from torch.nn.parallel import DistributedDataParallel

    try:
        averaged._sp_checked = False
        averaged._check_reduction(DistributedDataParallel(model, process_group=parallel.dp_group))
        results["ddp_subgroup"] = "accepted"
    except ValueError as err:
        results["ddp_subgroup"] = str(err)
    # and an accelerate ParallelismConfig asking for DeepSpeed ALST's SP
    from accelerate.parallelism_config import ParallelismConfig

    try:
        SeqparTrainer(model=model, args=arguments("pc", parallelism_config=ParallelismConfig(sp_size=2)),
                      train_dataset=train)
        results["parallelism_config"] = "accepted"
    except ValueError as err:
        results["parallelism_config"] = str(err)

    lap('bad_inputs')

    # 6. The Trainer's DeepSpeed integration (ZeRO-2), last: accelerate's state stays DeepSpeed's afterwards. The
    # Trainer then builds its own optimizer and schedule (optimizers= is not used), so only step 1, taken from the
    # same weights, compares: its loss and gradient norm (DeepSpeed averages over all W ranks too, no GA division)
    model, _ = model_and_optimizers()
    ds = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
          "gradient_clipping": "auto", "zero_optimization": {"stage": 2}}
    hf_ds = SeqparTrainer(model=model, args=arguments("ds", steps=1, deepspeed=ds), train_dataset=train)
    hf_ds.train()
    results["deepspeed"] = history(hf_ds)
    lap("deepspeed")
    dist.barrier()
    if parallel.is_main:
        (out / "results.json").write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
