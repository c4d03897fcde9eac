"""The memory planner (seqpar.train.planner) against measurements.

- A whole ``seqpar train`` process on CPU (issue 26): the planner's peak per rank, and ``--simulate``'s, within
  15% of the RSS high-water mark of each rank of a real run (seqpar.train.process_peak: 2 steps under torchrun,
  DeepSpeed and all), on two toy recipes of different shapes: ring attention at sp 2, ZeRO-2, fp32, gradient
  checkpointing, fused loss and tiled MLP; Ulysses at sp 2, ZeRO-3, bf16, full logits.
- One forward + backward of a Llama-3-shaped toy (vocab/hidden and MLP ratio of Llama-3-8B, scaled down) at 2
  ranks (ring attention) against the peak of live tensor storages (TrackedPeak), within 25%, memory options off
  and on: the activation formulas alone.
- --dry-run prints the estimate, --device-memory the longest sequence that fits, and the options lengthen it."""

from __future__ import annotations

import argparse
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import yaml

from seqpar.bench.measure import TrackedPeak
from seqpar.train.planner import ModelShape, activation_bytes, parse_bytes, step_peak
from tests.test_recipe import ROOT

pytestmark = pytest.mark.timeout(400)

# Toy recipes for the whole-process check: tiny models with a real vocabulary's share of memory, 2 steps.
PROCESS_BASE = {
    "model": {"from_config": {"model_type": "qwen2", "vocab_size": 32000, "hidden_size": 128,
                              "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
                              "num_key_value_heads": 2, "max_position_embeddings": 4096}},
    "attention": {"name": "ring", "sp_size": 2},
    "data": {"source": "passkey", "seq_len": 4096, "passkey": {"num_samples": 4}},
    "trainer": {"max_steps": 2, "lr": 1.0e-3, "warmup_steps": 1, "dtype": "fp32", "gradient_checkpointing": True,
                "seed": 0},
    "deepspeed": {"zero_stage": 2},
    "memory": {"fused_loss": True, "loss_chunk_size": 512, "tiled_mlp": True, "mlp_chunk_size": 512},
    "launch": {"nproc_per_node": 2, "device": "cpu"},
    "logging": {"wandb": False}, "checkpoint": {"every": 0},
}
PROCESS_CASES = {
    "ring, ZeRO-2, fp32, fused loss + tiled MLP": [],
    "ulysses, ZeRO-3, bf16, full logits": [
        "model.from_config.model_type=llama", "model.from_config.vocab_size=16000", "model.from_config.hidden_size=256",
        "model.from_config.num_hidden_layers=4", "attention.name=ulysses", "data.seq_len=2048",
        "trainer.dtype=bf16", "deepspeed.zero_stage=3", "memory.fused_loss=false", "memory.tiled_mlp=false"],
}

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
    # freed; the fused loss's float32 d W, which the planner counts in the loss head, becomes the head's gradient.
    grads = 4 * (shape.params - shape.vocab * shape.hidden * (2 if fused else 1))
    return measured, 4 * shape.params + grads + step_peak(parts)


# The full-logits head is checked by the whole-process test (its Ulysses case) at less cost.
CASES = [(True, 128, 256), (False, 128, 256)]


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


@pytest.fixture(scope="module")
def process_runs(tmp_path_factory):
    """Each toy recipe trained by a real ``seqpar train`` under torchrun (2 CPU ranks), and simulated (one
    fake-CUDA child for both), all at once: {case: (per-rank records, plan, simulated)}."""
    from seqpar.train.planner import plan_memory
    from seqpar.train.process_peak import measure
    from seqpar.train.recipe import load_recipe
    from seqpar.train.simulate import simulate_many
    from seqpar.train.validate import validate

    tmp = tmp_path_factory.mktemp("process")
    base = tmp / "toy.yaml"
    base.write_text(yaml.safe_dump(PROCESS_BASE))
    recipes = {name: load_recipe(base, overrides) for name, overrides in PROCESS_CASES.items()}
    configs = {name: validate(r, 2) for name, r in recipes.items()}
    with ThreadPoolExecutor(len(PROCESS_CASES) + 1) as pool:
        runs = {name: pool.submit(measure, base, overrides, 2, tmp / f"case{i}")
                for i, (name, overrides) in enumerate(PROCESS_CASES.items())}
        sims = pool.submit(simulate_many, [(recipes[n], configs[n], 2, None) for n in PROCESS_CASES])
        simulated = dict(zip(PROCESS_CASES, (s[0] for s in sims.result())))
        return {name: (runs[name].result(), plan_memory(recipes[name], configs[name], 2), simulated[name])
                for name in PROCESS_CASES}


@pytest.mark.parametrize("case", list(PROCESS_CASES))
def test_planner_and_simulate_within_15_percent_of_a_seqpar_train_process(process_runs, case):
    """The peak RSS of each rank of a real 2-step run above its RSS after the imports (glibc returning freed
    memory at once) against the planner's peak and the simulated step's, per rank: within 15%."""
    records, plan, sim = process_runs[case]
    measured = max(r["steps_peak"] for r in records)
    print(f"{case}: process peak {measured / 2**20:.1f} MiB (ranks "
          f"{[round(r['steps_peak'] / 2**20, 1) for r in records]}), planner {plan.total / 2**20:.1f} MiB "
          f"({plan.total / measured:.2f}x), simulated {sim.total / 2**20:.1f} MiB ({sim.total / measured:.2f}x)")
    assert 0.85 <= plan.total / measured <= 1.15, (case, measured, plan.lines())
    assert 0.85 <= sim.total / measured <= 1.15, (case, measured, sim.lines())


def test_the_planner_counts_each_kind_of_layer():
    """The planner reads the kinds of decoder layer from the model built on the meta device (no memory): Bamba's
    Mamba2 and softmax layers, Qwen3-Next's Gated DeltaNet and softmax layers over MoE MLPs, gpt-oss's MoE;
    and a Mamba2 layer's backward (its scan's [H, Q] float32 terms) outweighs a softmax layer's many times."""
    from seqpar.train.planner import plan_memory
    from seqpar.train.planner_layers import layer_facts
    from seqpar.train.recipe import load_recipe
    from seqpar.train.validate import validate

    expected = {"hybrid-bamba-9b-128k": "29 Mamba2 + dense MLP, 3 softmax attention + dense MLP",
                "hybrid-qwen3next-80b-256k": "36 Gated DeltaNet + MoE, 12 softmax attention + MoE",
                "window-gptoss-20b-128k": "24 softmax attention + MoE",
                "hybrid-kimi-linear-48b-128k": "1 Kimi Delta Attention + dense MLP, 20 Kimi Delta Attention + MoE, "
                                               "6 multi-head latent attention + MoE"}
    for name, layers in expected.items():
        recipe = load_recipe(ROOT / "recipes" / f"{name}.yaml")
        world = recipe.launch.nnodes * recipe.launch.nproc_per_node
        plan = plan_memory(recipe, validate(recipe, world), world)
        assert plan.layers == layers, (name, plan.layers)
    recipe = load_recipe(ROOT / "recipes" / "hybrid-bamba-9b-128k.yaml")
    mamba, attention = layer_facts(validate(recipe, 8))
    shape = ModelShape.of(validate(recipe, 8))
    per_kind = [activation_bytes(ModelShape(**{**shape.__dict__, "kinds": (k,)}), 16384, 2, checkpointing=True,
                                 offload=True)["working"] for k in (mamba, attention)]
    assert per_kind[0] > 4 * per_kind[1], per_kind
