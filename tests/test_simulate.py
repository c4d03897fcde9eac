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


def test_simulate_without_dry_run_is_a_one_line_error(capsys):
    from seqpar.train.cli import run

    assert run(_parser().parse_args([str(RING), "--simulate"])) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--simulate" in err and "--dry-run" in err, err
