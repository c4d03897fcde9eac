"""seqpar inside Hugging Face ``Trainer`` and TRL's ``SFTTrainer`` (``seqpar.integrations.hf``, issue 27).

One launch of 2 gloo ranks (tests/hf_trainer_harness.py): ``seqpar train``'s code (``setup`` + ``loop``, as the
CLI runs it) trains the SFT recipe with LoRA (SP = 2, ring attention, packed conversations, labels on the answers
only, DeepSpeed ZeRO-2) for 5 steps of 2 accumulated micro-batches, with an evaluation at step 5; then the same
model trains on the same batches in the same order through ``SeqparTrainer`` (DDP) and ``SeqparSFTTrainer`` (TRL
padding-free), and the controls and bad inputs run:

* the losses, the pre-clipping gradient norms and the eval loss equal seqpar train's (float32, 1e-5); so
  do step 1's through the Trainer's DeepSpeed ZeRO-2 integration;
* the feature is engaged: shifting each shard's labels alone changes the loss, and a loss averaged over the SP
  ranks instead of summed (what DDP does without the reduction) halves the gradient;
* a shard with no target token contributes 0 and the step's value is still the token mean; the fused
  head (``loss_chunk_size``) gives the same loss;
* SP batches in a plain ``Trainer`` (DDP without the SP reduction), DDP over the DP group only, SP ranks given
  different batches and an accelerate ``ParallelismConfig`` with ``sp_size`` fail in one line.

The single-process pieces (collator, sampler order) are checked without any launch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from seqpar.integrations.hf import SPBatchOrder, SPDataCollator, documents_from_positions
from seqpar.launcher import free_port
from tests.test_recipe import ROOT

OVERRIDES = ["lora.enabled=true", "trainer.max_steps=5", "trainer.micro_batch=2", "trainer.grad_accum=2",
             "data.sft.num_conversations=200", "data.eval_fraction=0.1", "eval.every=5", "eval.batches=2",
             "logging.log_every=1", "checkpoint.every=0"]
TIGHT = 1e-5


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(seqpar train's records, the harness's results): one launch of 2 ranks (tests/hf_trainer_harness.py)."""
    tmp = tmp_path_factory.mktemp("hf")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "tests.hf_trainer_harness", str(tmp), *OVERRIDES]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    results = json.loads((tmp / "results.json").read_text())
    seqpar = results.pop("seqpar")
    reference = [dict(zip(seqpar, values)) for values in zip(*seqpar.values())]
    assert len(reference) == 5 and reference[-1]["eval_loss"] is not None, seqpar
    return reference, results


def close(a: list[float], b: list[float], tol: float = TIGHT) -> float:
    assert len(a) == len(b) > 0, (a, b)
    worst = max(abs(x - y) / max(1.0, abs(y)) for x, y in zip(a, b))
    assert worst <= tol, (worst, a, b)
    return worst


def test_trainer_equals_seqpar_train(runs):
    reference, got = runs
    close(got["hf"]["loss"], [r["loss"] for r in reference])
    close(got["hf"]["grad_norm"], [r["grad_norm"] for r in reference])  # the reduced gradients, before clipping
    close([got["hf"]["eval_loss"]], [reference[-1]["eval_loss"]])  # the held-out token mean, same weights


def test_sft_trainer_equals_seqpar_train(runs):
    reference, got = runs
    if isinstance(got["trl"], str):
        pytest.skip(f"TRL is not installed ({got['trl']}): pip install trl")
    close(got["trl"]["loss"], [r["loss"] for r in reference])
    close(got["trl"]["grad_norm"], [r["grad_norm"] for r in reference])


def test_trainer_with_deepspeed_takes_the_same_first_step(runs):
    """The Trainer's DeepSpeed ZeRO-2 integration (its own optimizer, so only step 1 compares): the same loss and
    reduced gradient as seqpar train's, through DeepSpeed's average over all ranks and its accumulation."""
    reference, got = runs
    close(got["deepspeed"]["loss"], [reference[0]["loss"]])
    close(got["deepspeed"]["grad_norm"], [reference[0]["grad_norm"]])


def test_the_sp_reduction_and_the_global_shift_are_engaged(runs):
    reference, got = runs
    # loss averaged over the 2 SP ranks instead of summed: half the gradient (and the logged loss)
    assert abs(got["averaged"]["grad_norm"][0] / reference[0]["grad_norm"] - 0.5) < 1e-4, got["averaged"]
    assert abs(got["averaged"]["loss"][0] / reference[0]["loss"] - 0.5) < 1e-4, got["averaged"]
    # each shard shifted alone: targets lost at the shard edges and wrong ones at the zigzag seams
    assert abs(got["shard_shift_loss"] - got["global_shift_loss"]) > 1e-4, got  # 100 x the tolerance


def test_a_shard_without_targets_contributes_zero(runs):
    _, got = runs
    (count0, loss0, mean0), (count1, loss1, mean1) = got["few_targets"]
    assert count0 > 0 and count1 == 0 and loss1 == 0.0  # no NaN from the empty shard
    assert mean0 == mean1  # the eval value: the SP group's token mean, identical on both ranks
    assert abs((loss0 + loss1) / 2 - mean0) <= TIGHT * abs(mean0)  # DDP's average of S x W / T is the mean
    assert abs(got["fused_minus_full"]) <= TIGHT * abs(mean0)  # loss_chunk_size: the same loss without logits


def test_ddp_without_the_sp_reduction_is_refused(runs):
    _, got = runs
    assert "\n" not in got["plain"] and "average the SP ranks' partial gradients" in got["plain"], got["plain"]
    assert "\n" not in got["parallelism_config"] and "DeepSpeed ALST" in got["parallelism_config"], got
    assert "\n" not in got["ddp_subgroup"] and "averaged over 1 ranks, not the 2" in got["ddp_subgroup"], got
    assert "\n" not in got["mismatch"] and "received different batches" in got["mismatch"], got


# --- single process ----------------------------------------------------------------------------------------


def test_batch_order_gives_sp_ranks_the_same_batches():
    """accelerate deals batches round-robin over W ranks: rank r gets batch k*W + r."""
    order = SPBatchOrder(range(10), batch_size=2, sp_size=2, dp_size=2, shuffle_seed=3)
    flat = list(order)
    assert len(flat) == len(order) == 2 * 2 * 6  # 5 batches padded to 6 (a multiple of dp_size), twice each
    batches = [flat[i:i + 2] for i in range(0, len(flat), 2)]
    W = 4
    per_rank = [batches[r::W] for r in range(W)]
    assert per_rank[0] == per_rank[1] and per_rank[2] == per_rank[3]  # SP groups {0, 1}, {2, 3}
    assert per_rank[0] != per_rank[2]
    seen = {i for b in per_rank[0] + per_rank[2] for i in b}
    assert seen == set(range(10))  # every sample, the padding repeating the first ones
    order.set_epoch(1)
    assert list(order) != flat  # a new permutation per epoch


def test_collator_shards_packed_rows_with_global_shift():
    collator = SPDataCollator(None, "zigzag", pad_token_id=0)  # one device: the whole batch
    features = [{"input_ids": [5, 6, 7, 8, 9], "labels": [-100, 6, 7, -100, 9], "seq_lengths": [3, 2]},
                {"input_ids": [1, 2, 3], "seq_lengths": [3]}]
    out = collator(features)
    # rows laid end to end: [5 6 7 8 9 | 1 2 3 . . | pad to a multiple of 2] with documents 3, 2, 3, 2 (padding)
    assert out["input_ids"].tolist() == [[5, 6, 7, 8, 9, 1, 2, 3, 0, 0]]
    assert out["cu_seqlens"].tolist() == [0, 3, 5, 8, 10]
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 0, 1]]
    # next-token targets, none across a document end or into padding, none where the label is -100
    assert out["labels"].tolist() == [[6, 7, -100, 9, -100, 2, 3, -100, -100, -100]]


def test_documents_from_padding_free_positions():
    assert documents_from_positions(torch.tensor([[0, 1, 2, 0, 1, 0]])) == [[3, 2, 1]]
    assert documents_from_positions(torch.arange(4).expand(2, 4)) is None
    with pytest.raises(ValueError, match=r"0, 1, 2, \.\.\. within each document"):
        documents_from_positions(torch.tensor([[0, 1, 3, 4]]))
