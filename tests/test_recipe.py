"""Recipe schema, validation and --dry-run: every bad recipe fails before any process group, naming the key,
the value and the fix; every recipe in recipes/ resolves for its intended world size."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from seqpar.train.cli import add_arguments, run
from seqpar.train.recipe import RecipeError, load_recipe, parse_override, recipe_from_dict
from seqpar.train.validate import validate

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
QUICK = ROOT / "recipes" / "quickstart-cpu.yaml"

# (overrides on the quick-start recipe, world size, substrings the message must contain: key, value, fix)
BAD = [
    (["trainr.max_steps=3"], 2, ["trainr", "did you mean trainer"]),
    (["trainer.learning_rate=0.1"], 2, ["trainer.learning_rate", "did you mean trainer.lr"]),
    (["trainer.max_steps=ten"], 2, ["trainer.max_steps='ten'", "an integer"]),
    (["attention.name=flash"], 2, ["attention.name='flash'", "'ring'", "'ulysses'"]),
    (["attention.layout=spiral"], 2, ["attention.layout='spiral'", "'zigzag'"]),
    (["attention.name=ring", "data.seq_len=510"], 2, ["data.seq_len=510", "multiple of 4", "[508, 512]"]),
    (["attention.sp_size=3", "data.seq_len=513"], 4, ["attention.sp_size=3", "world size 4", "[1, 2, 4]"]),
    (["lora.targets=[q_proj,query_key_value]"], 2, ["lora.targets", "query_key_value", "'q_proj'"]),
    (["attention.group_size_ratio=0.3"], 2, ["attention.group_size_ratio=0.3", "even whole number", "0.25"]),
    (["attention.name=ulysses", "attention.sp_size=8", "data.seq_len=512"], 8,
     ["num_attention_heads", "4 heads", "attention.name=ring"]),
    (["trainer.schedule=exponential"], 2, ["trainer.schedule='exponential'", "'cosine'"]),
    (["deepspeed.zero_stage=4"], 2, ["deepspeed.zero_stage=4", "0, 1, 2, 3"]),
    (["trainer.dtype=fp16"], 2, ["trainer.dtype='fp16'", "'bf16'"]),
    (["deepspeed.zero_stage=0", "deepspeed.offload=cpu"], 2, ["deepspeed.offload='cpu'", "zero_stage to 2 or 3"]),
    (["attention.name=lasp2"], 2, ["attention.name='lasp2'", "model_type='llama'", "'ring', 'rsa', 'ulysses'"]),
    (["rope_scaling.factor=0.5"], 2, ["rope_scaling.factor=0.5", ">= 1"]),
    (["lora.r=0"], 2, ["lora.r=0", ">= 1"]),
    (["lora.trainable=[embed,bias]"], 2, ["lora.trainable", "'bias'", "valid extras"]),
    (["data.source=files"], 2, ["data.files=[]", "local jsonl"]),
    (["model.from_config.vocab_size=100"], 2, ["vocab_size=100", "byte tokenizer needs >= 259"]),
    (["model.path=/nowhere"], 2, ["model:", "exactly one of model.path"]),
    (["model.from_config.model_type=jamba"], 2, ["model_type='jamba'", "Mamba", "zero state"]),
    (["model.from_config.model_type=qwen3_next", "attention.name=lasp2"], 2,
     ["attention.name='lasp2'", "model_type='qwen3_next'", "softmax layers", "'allgather' is LASP-2H"]),
    # a hybrid runs zigzag (its linear layers fold 2N maps): the length must split into 2N equal chunks
    (["model.from_config.model_type=qwen3_next", "attention.name=ring", "attention.layout=zigzag",
      "data.seq_len=510"], 2, ["data.seq_len=510", "zigzag layout", "multiple of 4", "[508, 512]"]),
    (["model.from_config.model_type=mistral", "model.from_config.sliding_window=128"], 2,
     ["attention.name='s2'", "model_type='mistral'", "sliding window of 128 tokens", "data.seq_len=512", "'ring'"]),
    (["model.from_config.model_type=gpt_oss", "model.from_config.num_local_experts=4", "attention.name=rsa",
      "attention.layout=contiguous"], 2, ["attention.name='rsa'", "model_type='gpt_oss'", "sinks", "'ring'"]),
    (["model.from_config.model_type=llama4_text", "model.from_config.attention_chunk_size=64",
      "attention.name=ulysses"], 2, ["attention.name='ulysses'", "chunks of 64 tokens", "['ring', 'allgather'"]),
    (["trainer.betas=[0.9]"], 2, ["trainer.betas=[0.9]", "two numbers"]),
    (["attention.name=s2", "attention.sp_size=2", "attention.layout=zigzag"], 2,
     ["attention.layout='zigzag'", "contiguous"]),
    (["memory.loss_chunk_size=0"], 2, ["memory.loss_chunk_size=0", "positive"]),
    (["memory.mlp_chunk_size=-4"], 2, ["memory.mlp_chunk_size=-4", "positive"]),
    (["memory.fused_loss=true", "lora.targets=[q_proj,lm_head]"], 2, ["memory.fused_loss", "drop lm_head"]),
    (["memory.offload_checkpoints=true"], 2, ["memory.offload_checkpoints=True", "gradient_checkpointing=true"]),
    (["memory.offload_checkpoints=maybe"], 2, ["memory.offload_checkpoints='maybe'", "'required'"]),
    (["model.from_config.model_type=gpt_oss", "model.from_config.num_local_experts=4", "attention.name=ring",
      "memory.tiled_mlp=true"], 2,
     ["memory.tiled_mlp=true", "LlamaMLP", "MoE", "memory.tiled_mlp=false"]),
]


def test_offload_required_without_cuda_is_rejected():
    import torch

    recipe = load_recipe(QUICK, ["memory.offload_checkpoints=required", "trainer.gradient_checkpointing=true"])
    validate(recipe, 2)  # a dry run may plan for a GPU machine
    if not torch.cuda.is_available():
        with pytest.raises(RecipeError, match="no CUDA GPU is visible"):
            validate(recipe, 2, check_paths=True)


@pytest.mark.parametrize(("overrides", "world", "needles"), BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_recipe_is_rejected_with_key_value_and_fix(overrides, world, needles):
    with pytest.raises(RecipeError) as err:
        validate(load_recipe(QUICK, overrides), world)
    message = str(err.value)
    for needle in needles:
        assert needle in message, f"{needle!r} missing from:\n{message}"


WINDOWED = {  # sliding windows of 128 tokens on the quick start's 512 (issue 24)
    "mistral": ["model.from_config.sliding_window=128"],
    "qwen3": ["model.from_config.use_sliding_window=true", "model.from_config.sliding_window=128",
              "model.from_config.layer_types=[sliding_attention,full_attention]"],
    "gemma3_text": ["model.from_config.sliding_window=128", "model.from_config.head_dim=16"],
    "gpt_oss": ["model.from_config.sliding_window=128", "model.from_config.head_dim=16",
                "model.from_config.num_local_experts=4"],
}


@pytest.mark.parametrize("model_type", list(WINDOWED))
def test_windowed_models_validate_with_primitives_that_take_windows(model_type):
    """Accepted with ring, ulysses and allgather (they apply the window); s2 refuses a window shorter than
    data.seq_len in one line, and accepts one at least as long."""
    base = [f"model.from_config.model_type={model_type}", *WINDOWED[model_type]]
    for name in ("ring", "ulysses", "allgather"):
        validate(load_recipe(QUICK, [*base, f"attention.name={name}"]), 2)
    with pytest.raises(RecipeError, match=r"attention.name='s2' with model_type=.*sliding window of 128 tokens"):
        validate(load_recipe(QUICK, base), 2)
    if model_type != "gpt_oss":  # gpt-oss's sinks: s2 refuses them at any length
        long = [o.replace("=128", "=4096") for o in base]
        validate(load_recipe(QUICK, long), 2)


def test_every_error_is_listed_at_once():
    with pytest.raises(RecipeError) as err:
        validate(load_recipe(QUICK, ["lora.r=0", "trainer.micro_batch=0", "checkpoint.keep=0"]), 2)
    assert all(k in str(err.value) for k in ("lora.r=0", "trainer.micro_batch=0", "checkpoint.keep=0"))


def test_overrides_are_yaml_scalars():
    assert parse_override("trainer.lr=1e-4") == (["trainer", "lr"], "1e-4")  # YAML 1.1; the float field coerces it
    assert load_recipe(QUICK, ["trainer.lr=1e-4"]).trainer.lr == 1e-4
    assert parse_override("trainer.gradient_checkpointing=true")[1] is True
    r = load_recipe(QUICK, ["lora.targets=q_proj,v_proj", "trainer.max_steps=3", "rope_scaling.factor=4"])
    assert r.lora.targets == ["q_proj", "v_proj"] and r.trainer.max_steps == 3 and r.rope_scaling.factor == 4.0
    with pytest.raises(RecipeError, match=r"dotted\.key=value"):
        parse_override("trainer.max_steps")
    assert recipe_from_dict({}).attention.name == "full"  # every field has a default


def test_rope_factor_auto_is_ceil_of_target_over_original():
    from seqpar.train.model import apply_rope_scaling, base_config

    r = load_recipe(QUICK, ["data.seq_len=600"])
    config = base_config(r)
    spec = apply_rope_scaling(r, config)
    assert spec["factor"] == 3.0 and spec["rope_type"] == "linear"  # ceil(600 / 256)


def _parse(argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_dry_runs_for_its_world_size(path, capsys):
    recipe = load_recipe(path)
    first = path.read_text().splitlines()[0]
    assert first.startswith("#"), "every recipe starts with a comment"
    assert "seqpar train" in path.read_text().split("\nmodel:")[0] or "sbatch" in path.read_text()
    assert run(_parse([str(path), "--dry-run"])) == 0
    out = capsys.readouterr().out
    world = recipe.launch.nnodes * recipe.launch.nproc_per_node
    assert f"world {world} = " in out and f"sp_size {recipe.attention.sp_size}" in out
    if recipe.model.path and not Path(recipe.model.path).exists():
        assert "is not on this machine" in out  # dry-run used the recipe's model.config facts
    # packed documents and an attention that cannot keep them apart: said once, in the plan (issue 17)
    d = recipe.data
    packed_across = d.source == "files" and d.pack and recipe.attention.name not in ("ring", "allgather", "full")
    assert ("# warning: attention.name=" in out) == packed_across, out[-600:]


def test_dry_run_rejects_a_world_the_recipe_cannot_use(capsys):
    assert run(_parse([str(QUICK), "--dry-run", "--world-size", "3"])) == 2
    assert "attention.sp_size=2 does not divide the world size 3" in capsys.readouterr().err
