"""The loss rule (issue 25): the loss of an optimizer step is the mean over ALL target tokens of its global
batch, whatever their split over SP ranks, DP ranks and accumulation micro-steps.

One spawn of 4 gloo ranks (SP = 2 x DP = 2, grad_accum = 2) runs ``seqpar.train.trainer.train_step`` on a tiny
float64 Llama (ring attention) whose four micro-batches hold 3, 300, 41 and 128 target tokens (SFT-style
labels, -100 elsewhere; the 3 lie on one SP rank, so the other has none), and compares with one process
computing the same model on the whole global batch:

* through a float64 stand-in for DeepSpeed's gradient rule (``AveragingEngine``: backward of x / G, average
  over the W ranks at the boundary, nothing else): loss and gradients within 1e-10;
* through a real DeepSpeed ZeRO-2 engine built by ``build_engine``: the loss within 1e-10 (our float64
  reduction), the gradients within 1e-6 relative (ZeRO keeps fp32 master gradients whatever the model dtype,
  and DeepSpeed's ZeRO-0 refuses float64 gradients on CPU), which also checks the stand-in against DeepSpeed;
* the old rule (micro-batch means averaged, then DP means averaged) misses both by more than 1e-2;
* packed ``source: files`` data, whose rows hold different numbers of document boundaries (shard_batch
  masks each), logs the token-weighted loss (1e-10), and ``evaluate`` is the held-out token mean.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from tests.dist import run_ranks
from tests.test_recipe import QUICK

L = 512  # tokens per sequence: 256 per SP rank
SPANS = [(9, 12), (100, 400), (300, 341), (0, 128)]  # labels = input_ids on [a, b): b - a targets (- 1 if a = 0)
OVERRIDES = ["attention.name=ring", "attention.sp_size=2", "lora.enabled=false", "rope_scaling.type=null",
             "rope_scaling.factor=null", f"data.seq_len={L}", f"model.from_config.max_position_embeddings={L}",
             "model.from_config.initializer_range=0.3",  # spiky logits: token losses that differ a lot
             "trainer.micro_batch=1", "trainer.grad_accum=2", "trainer.max_grad_norm=0", "deepspeed.zero_stage=2",
             "logging.wandb=false", "eval.batches=2"]
TIGHT = 1e-10
DS_FP32 = 1e-6


class AveragingEngine(torch.nn.Module):
    """DeepSpeed's documented gradient rule in float64 and nothing else: ``backward(x)`` backpropagates
    ``x / G``; every G-th ``step()`` all-reduces the gradients (SUM) over the W ranks, divides by W, records
    them in ``grads`` and clears them (no optimizer update)."""

    def __init__(self, module: torch.nn.Module, accum: int):
        super().__init__()
        self.module, self.accum, self.micro, self.grads = module, accum, 0, {}

    def forward(self, **inputs):
        return self.module(**inputs)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accum).backward()

    def step(self) -> None:
        self.micro += 1
        if self.micro % self.accum:
            return
        self.grads = {}
        for name, p in self.module.named_parameters():
            g = p.grad.clone()
            dist.all_reduce(g)
            self.grads[name] = g / dist.get_world_size()
            p.grad = None


def sft_samples(seed: int = 0) -> list[dict]:
    """One sample per span: random bytes, labels the tokens of the span (an answer), -100 elsewhere."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for a, b in SPANS:
        ids = torch.randint(3, 259, (L,), generator=gen)
        labels = torch.full_like(ids, -100)
        labels[a:b] = ids[a:b]
        out.append({"input_ids": ids, "doc_lens": [L], "labels": labels})
    return out


def write_docs(path: Path) -> Path:
    """Documents of very different lengths (1 to 80 words): rows packed from them hold 3 to 24."""
    rng = random.Random(1)
    words = ["seq", "par", "ring", "a", "token", "of"]
    lens = [1] * 90 + [2] * 60 + [20, 40, 60, 80, 3, 50, 70] * 6
    rng.shuffle(lens)
    path.write_text("".join(json.dumps({"text": " ".join(rng.choice(words) for _ in range(n))}) + "\n"
                            for n in lens))
    return path


def doc_segments(batch: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, unshifted labels) of every document of a batch: what one process runs separately."""
    labels = batch.get("labels", batch["input_ids"])
    out = []
    for row, (ids, lab) in enumerate(zip(batch["input_ids"], labels)):
        start = 0
        for n in batch["doc_lens"][row]:
            out.append((ids[start:start + n], lab[start:start + n]))
            start += n
    return out


def reference(model, batches: dict, accum: int, dp: int) -> dict:
    """One process, the whole global batch: the token mean and its gradients, and the old rule's (micro means
    averaged, then DP means averaged) with its gradients; float64."""
    params = dict(model.named_parameters())
    sums, counts = {}, {}
    for key, batch in batches.items():
        s, c = torch.zeros((), dtype=torch.float64), 0
        for ids, lab in doc_segments(batch):
            if len(ids) < 2:
                continue
            logits = model(input_ids=ids[None], use_cache=False).logits[0]
            s = s + F.cross_entropy(logits[:-1], lab[1:], ignore_index=-100, reduction="sum")
            c += int((lab[1:] != -100).sum())
        sums[key], counts[key] = s, c
    total = sum(counts.values())
    new = sum(sums.values()) / total
    old = sum(sums[k] / counts[k] for k in sums) / (accum * dp)
    g_new = torch.autograd.grad(new, list(params.values()), retain_graph=True)
    g_old = torch.autograd.grad(old, list(params.values()))
    return {"loss": new.item(), "old_loss": old.item(), "counts": counts, "targets": total,
            "grads": dict(zip(params, g_new)), "old_grads": dict(zip(params, g_old))}


def rel(got: dict, want: dict) -> float:
    """Worst over parameters of max |got - want| / max |want|."""
    return max(((got[n].double() - w).abs().max() / w.abs().max().clamp(min=1e-300)).item() for n, w in want.items())


def check_loss_rule(rank: int, world: int, group, out_dir: str, docs: str) -> dict:
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    from seqpar.parallel import ParallelState
    from seqpar.train import trainer
    from seqpar.train.data import batch_at, build_dataset, byte_tokenizer
    from seqpar.train.engine import build_engine
    from seqpar.train.model import load_model
    from seqpar.train.recipe import load_recipe

    recipe = load_recipe(QUICK, [*OVERRIDES, f"trainer.output_dir={out_dir}"])
    files = load_recipe(QUICK, [*OVERRIDES, f"trainer.output_dir={out_dir}", "data.source=files",
                                f"data.files=[{docs}]", "data.pack=true"])
    parallel = ParallelState.from_initialized(2)
    deepspeed.init_distributed(dist_backend="gloo")
    base = trainer.base_model_path(recipe, rank, byte_tokenizer())
    model = trainer.prepare_model(recipe, base, parallel).double()
    accum, dp = recipe.trainer.grad_accum, parallel.dp_size
    sft, packed = sft_samples(), build_dataset(files, byte_tokenizer())
    out: dict = {}

    # 1. the float64 stand-in: loss and gradients of train_step; packed files; evaluate
    stand_in = AveragingEngine(model, accum)
    out["sft"] = trainer.train_step(stand_in, sft, recipe, 0, parallel)
    out["sft_grads"] = stand_in.grads
    out["files"] = trainer.train_step(stand_in, packed, files, 0, parallel)
    out["files_grads"] = stand_in.grads
    held = packed[-4:]
    out["eval"] = trainer.evaluate(stand_in, held, files, parallel)

    # 2. a real DeepSpeed ZeRO-2 engine (the recipes' default stage): the gradients read at the boundary
    engine = build_engine(model, recipe, parallel.device)
    captured: dict = {}
    real_step = engine.step

    def step():
        if engine.is_gradient_accumulation_boundary():  # reduced, not yet clipped or applied
            captured.update({n: safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()})
        real_step()

    engine.step = step
    out["ds"] = trainer.train_step(engine, sft, recipe, 0, parallel)
    out["ds_grads"] = captured
    if rank:
        return {k: v for k, v in out.items() if not k.endswith("grads")}

    # 3. one process, the whole global batch, the unpatched model with the same (initial) weights
    one = load_model(recipe, base).double()
    for name, batches, rec in (("sft", sft, recipe), ("files", packed, files)):
        whole = {(d, m): batch_at(batches, rec, 0, m, d, dp) for d in range(dp) for m in range(accum)}
        out[f"{name}_ref"] = reference(one, whole, accum, dp)
    from seqpar.train.data import eval_batch

    ev = {(i, d): eval_batch(held, files, i, d, dp) for i in range(files.eval.batches) for d in range(dp)}
    segs = [s for b in ev.values() for s in doc_segments(b) if len(s[0]) > 1]
    with torch.no_grad():
        total = sum(F.cross_entropy(one(input_ids=i[None]).logits[0, :-1], y[1:], reduction="sum") for i, y in segs)
    out["eval_ref"] = (total / sum(len(i) - 1 for i, _ in segs)).item()
    return out


def test_one_loss_whatever_the_split(tmp_path):
    docs = write_docs(tmp_path / "docs.jsonl")
    ranks = run_ranks(check_loss_rule, 4, args=(str(tmp_path / "run"), str(docs)), timeout=240)
    r0 = ranks[0]
    for name in ("sft", "files", "ds", "eval"):  # every rank logs the same value
        assert len({r[name] for r in ranks}) == 1, [r[name] for r in ranks]

    ref = r0["sft_ref"]
    assert sorted(ref["counts"].values()) == [3, 41, 127, 300], ref["counts"]  # uneven: 3 vs 300 targets
    loss, targets = r0["sft"]
    assert targets == ref["targets"] == 471
    err = {"loss": abs(loss - ref["loss"]) / ref["loss"], "grads": rel(r0["sft_grads"], ref["grads"]),
           "ds_loss": abs(r0["ds"].loss - ref["loss"]) / ref["loss"], "ds_grads": rel(r0["ds_grads"], ref["grads"]),
           "ds_vs_stand_in": rel(r0["ds_grads"], r0["sft_grads"])}
    # the old rule, measured against the same reference
    old = {"loss": abs(ref["old_loss"] - ref["loss"]) / ref["loss"], "grads": rel(ref["old_grads"], ref["grads"])}
    f_ref = r0["files_ref"]
    err["files_loss"] = abs(r0["files"].loss - f_ref["loss"]) / f_ref["loss"]
    err["files_grads"] = rel(r0["files_grads"], f_ref["grads"])
    err["eval"] = abs(r0["eval"] - r0["eval_ref"]) / r0["eval_ref"]
    old["files_loss"] = abs(f_ref["old_loss"] - f_ref["loss"]) / f_ref["loss"]
    print(f"loss rule, relative errors: {({k: f'{v:.1e}' for k, v in err.items()})}; old rule: "
          f"{({k: f'{v:.1e}' for k, v in old.items()})}; packed counts {sorted(f_ref['counts'].values())}")

    assert err["loss"] <= TIGHT and err["grads"] <= TIGHT
    assert err["ds_loss"] <= TIGHT and err["ds_grads"] <= DS_FP32 and err["ds_vs_stand_in"] <= DS_FP32
    assert old["loss"] > 1e-2 and old["grads"] > 1e-2  # the old averaging fails the same check by far
    # packed documents: rows with different numbers of boundaries, now token-weighted
    assert len(set(f_ref["counts"].values())) > 1, f_ref["counts"]
    assert err["files_loss"] <= TIGHT and err["files_grads"] <= TIGHT and err["eval"] <= TIGHT
    assert old["files_loss"] > 1e3 * TIGHT


def test_summed_losses_add_up_to_the_mean():
    """``reduction="sum"`` (full logits and fused head): this rank's summed token loss, no communication,
    equal to the mean form times the target count."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from seqpar.models import causal_lm_loss

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    ids = torch.randint(0, 50, (2, 12))
    labels = torch.roll(ids, -1, 1)
    labels[0, 3:] = -100
    inputs = {"input_ids": ids, "position_ids": torch.arange(12).expand(2, 12)}
    mean = causal_lm_loss(model, inputs, labels, None)
    count = int((labels != -100).sum())
    for chunk in (None, 5):
        total = causal_lm_loss(model, inputs, labels, None, chunk_size=chunk, reduction="sum")
        assert abs(total.item() - mean.item() * count) <= 1e-4 * total.item()
    try:
        causal_lm_loss(model, inputs, labels, None, reduction="none")
    except ValueError as err:
        assert "reduction='none'" in str(err)
    else:
        raise AssertionError("reduction='none' was accepted")
