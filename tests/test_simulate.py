"""``seqpar train RECIPE --dry-run --simulate`` (seqpar.train.simulate, issue 26): one training step of the recipe's
model on fake CUDA as one rank of the planned world, its peak next to the planner's.

The GPU recipe here is recipes/ring-llama3-8b-128k.yaml as written (ring attention, zigzag, sp 8 on 8 ranks,
ZeRO-3, bf16, gradient checkpointing with offload, fused loss, tiled MLP, YaRN) with the model shrunk to a toy
so that the step takes seconds: each measured activation phase (forward, backward) must agree with the planner's
within 25%. The totals are only reported: the state (parameters, Adam, DeepSpeed's buckets) is the planner's
formula on both sides and is ~95% of this toy's total, so a bound on the totals could not fail. The whole-process check
(planner and simulate against a real ``seqpar train`` on CPU) is in tests/test_planner.py.
"""

from __future__ import annotations

import argparse
import re

import pytest

from tests.test_recipe import ROOT

pytestmark = pytest.mark.timeout(300)

RING = ROOT / "recipes" / "ring-llama3-8b-128k.yaml"
TOY = ["model.config.hidden_size=256", "model.config.intermediate_size=896", "model.config.num_hidden_layers=2",
       "model.config.num_attention_heads=4", "model.config.num_key_value_heads=1", "model.config.vocab_size=8016",
       "data.seq_len=65536", "memory.loss_chunk_size=512", "memory.mlp_chunk_size=2048"]


def _parser() -> argparse.ArgumentParser:
    from seqpar.train.cli import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser


def _bytes(text: str) -> float:
    value, unit = text.split()
    return float(value) * {"MiB": 2**20, "GiB": 2**30}[unit]


SIZE = r"([0-9.]+ [MG]iB)"


def test_simulate_runs_a_step_and_agrees_with_the_planner(capsys):
    from seqpar.train.cli import run

    assert run(_parser().parse_args([str(RING), *TOY, "--dry-run", "--simulate"])) == 0
    out = capsys.readouterr().out
    print(out[out.index("estimated peak"):])
    total = re.search(rf"simulated peak memory per rank: {SIZE} .*planner {SIZE}, ([0-9.]+)x of it", out)
    assert total, out
    phases = re.search(rf"measured activations: forward {SIZE} \(planner {SIZE}\), backward {SIZE} \(planner {SIZE}\)",
                       out)
    assert phases, out
    forward, planned_forward, backward, planned_backward = (_bytes(phases.group(i)) for i in range(1, 5))
    assert forward > 0 and backward > 0
    assert 0.75 <= planned_forward / forward <= 1.25, (forward, planned_forward)
    assert 0.75 <= planned_backward / backward <= 1.25, (backward, planned_backward)
    assert "8192 tokens per rank" in out  # 65536 over the recipe's 8 ranks: the step ran one rank's shard


QWEN3NEXT = ROOT / "recipes" / "hybrid-qwen3next-80b-256k.yaml"
HYBRID_TOY = [f"model.config.{key}={value}" for key, value in dict(
    hidden_size=128, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
    linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=32, linear_value_head_dim=32,
    num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64, shared_expert_intermediate_size=64,
    intermediate_size=256, vocab_size=1024).items()] + ["data.seq_len=4096"]


def test_a_prefix_with_every_kind_of_layer_stands_for_the_whole_model():
    """Qwen3-Next's layers repeat (3 Gated DeltaNet, 1 softmax attention); the simulated step builds the 5 that hold
    each kind before the last, and adds what each left-out layer keeps (checkpointed, not offloaded: its input and
    its delta-rule segment states) as its counterpart in the prefix measured. Equal to the step of all 8 layers."""
    from seqpar.train.recipe import load_recipe
    from seqpar.train.simulate import simulate_many
    from seqpar.train.validate import validate

    recipe = load_recipe(QWEN3NEXT, HYBRID_TOY)
    world = recipe.launch.nnodes * recipe.launch.nproc_per_node
    config = validate(recipe, world)
    assert config.layer_types[:4] == ["linear_attention"] * 3 + ["full_attention"]
    short = load_recipe(QWEN3NEXT, [*HYBRID_TOY, "model.config.num_hidden_layers=5"])  # the prefix as a model
    (prefix,), (five,), (whole,) = simulate_many([(recipe, config, world, None),
                                                  (short, validate(short, world), world, None),
                                                  (recipe, config, world, None, 8)])  # all 8 layers
    print(f"5 of 8 layers: forward {prefix.forward}, backward {prefix.backward}; all 8: forward {whole.forward}, "
          f"backward {whole.backward}; a 5-layer model: forward {five.forward}")
    assert (prefix.layers, whole.layers, five.layers) == (5, 8, 5)
    assert five.forward < prefix.forward == whole.forward, (five, prefix, whole)  # the left-out layers' keep added
    # the backward's bound: at most the bytes kept by the layers after the one whose backward peaks
    assert whole.backward <= prefix.backward <= whole.backward * 1.05, (prefix, whole)


def test_simulate_without_dry_run_is_a_one_line_error(capsys):
    from seqpar.train.cli import run

    assert run(_parser().parse_args([str(RING), "--simulate"])) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--simulate" in err and "--dry-run" in err, err
