"""The memory planner (seqpar.train.planner): its estimate of one forward + backward of a Llama-3-shaped toy
(vocab/hidden and MLP ratio of Llama-3-8B, scaled down) against the measured peak of live tensor storages
(TrackedPeak), within 25%, with the memory options off and on, at 1 rank and at 2 (ring attention);
--dry-run prints it, --device-memory the longest sequence that fits, and the options lengthen it."""

from __future__ import annotations

import argparse

import pytest
import torch

from seqpar.bench.measure import TrackedPeak
from seqpar.train.planner import ModelShape, activation_bytes, parse_bytes, step_peak
from tests.test_recipe import ROOT

TOY = {"vocab_size": 8016, "hidden_size": 256, "intermediate_size": 896, "num_hidden_layers": 2,
       "num_attention_heads": 4, "num_key_value_heads": 1}  # V/d 31.3, I/d 3.5, GQA 4:1 as Llama-3-8B
L = 1024


def _measured_and_estimated(checkpointing: bool, fused: int | None, mlp: int | None, group=None,
                            world: int = 1) -> tuple[int, int]:
    """One step of the toy on this rank (``world`` > 1: ring attention over ``group``, L tokens per rank)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from seqpar.models import causal_lm_loss, patch_model, patched_layout, shard_batch
    from seqpar.models.tiled_mlp import tile_mlp

    torch.manual_seed(0)
    config = LlamaConfig(**TOY, max_position_embeddings=L * world)
    model = LlamaForCausalLM(config).train()
    model.set_attn_implementation("sdpa")
    layout = "contiguous"
    if world > 1:
        patch_model(model, "ring", group)
        layout = patched_layout(model)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if mlp:
        tile_mlp(model, mlp)
    ids = torch.randint(0, TOY["vocab_size"], (1, L * world), generator=torch.Generator().manual_seed(0))
    sp = shard_batch({"input_ids": ids}, group, layout)
    labels = sp.pop("labels")
    with TrackedPeak() as tracked:
        causal_lm_loss(model, sp, labels, group, chunk_size=fused).backward()
    if world > 1:
        from seqpar.models import attention_calls

        assert attention_calls(model).get("ring"), "the ring attention did not run"
    shape = ModelShape.of(config)
    assert shape.params == sum(p.numel() for p in model.parameters())
    measured = tracked.peak + 4 * shape.params  # parameters existed before; gradients are allocated inside
    parts = activation_bytes(shape, L, 4, attention="ring", sp=world, checkpointing=checkpointing,
                             fused_chunk=fused, mlp_chunk=mlp)
    # One step from zero gradients: the input embedding's gradient is made last, after the activations are
    # freed (the planner itself counts every gradient: they persist between steps).
    grads = 4 * (shape.params - shape.vocab * shape.hidden)
    return measured, 4 * shape.params + grads + step_peak(parts)


CASES = [(False, None, None), (True, 128, 256), (False, 128, 256)]


@pytest.mark.parametrize(("checkpointing", "fused", "mlp"), CASES)
def test_estimate_within_25_percent_of_measured(checkpointing, fused, mlp):
    measured, estimate = _measured_and_estimated(checkpointing, fused, mlp)
    print(f"checkpointing={checkpointing} fused={fused} mlp={mlp}: measured {measured / 2**20:.1f} MiB, "
          f"estimated {estimate / 2**20:.1f} MiB")
    assert 0.75 <= estimate / measured <= 1.25, (measured, estimate)



def _two_rank_cases(rank: int, world: int, group) -> list[tuple[int, int]]:
    return [_measured_and_estimated(*case, group=group, world=world) for case in CASES]


def test_estimate_within_25_percent_of_measured_at_two_ranks():
    """The same toy on 2 ranks (ring attention, L tokens per rank: what the planner sees per rank), every
    case in one spawn; the peak is the larger rank's."""
    from seqpar.launcher import spawn_ranks

    ranks = spawn_ranks(_two_rank_cases, 2, timeout=120)
    for case, *per_rank in zip(CASES, *ranks):
        measured, estimate = max(m for m, _ in per_rank), per_rank[0][1]
        print(f"2 ranks, checkpointing/fused/mlp={case}: measured {measured / 2**20:.1f} MiB, "
              f"estimated {estimate / 2**20:.1f} MiB")
        assert 0.75 <= estimate / measured <= 1.25, (case, measured, estimate)


def test_dry_run_prints_estimate_and_longest_fitting_length(capsys):
    from seqpar.train.cli import add_arguments, run

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    recipe = str(ROOT / "recipes" / "ring-llama3-8b-128k.yaml")
    longest = []
    for extra in ([], ["memory.fused_loss=false", "memory.tiled_mlp=false", "memory.offload_checkpoints=false"]):
        assert run(parser.parse_args([recipe, *extra, "--dry-run", "--device-memory", "80GiB"])) == 0
        out = capsys.readouterr().out
        assert "estimated peak memory per rank:" in out and "optimizer states" in out
        longest.append(int(out.split("(10% headroom kept): ")[1].split()[0]))
    assert longest[0] > 4 * longest[1] > 0  # the memory options buy a much longer context
    assert parse_bytes("80GiB") == 80 * 2**30 and parse_bytes("1.5 GB") == 1_500_000_000
