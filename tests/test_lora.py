"""LongLoRA+ trainable set and merge-lora, in one process (the DeepSpeed-saved variants are in test_train.py)."""

from __future__ import annotations

import json

import pytest
import torch

from seqpar.lora_merge import merge_lora
from seqpar.train.checkpoint import MARKER
from seqpar.train.lora import apply_lora, count_parameters, trainable_parameter_names
from seqpar.train.recipe import load_recipe, save_recipe
from tests.test_recipe import QUICK

TINY = ["model.from_config.hidden_size=32", "model.from_config.intermediate_size=64",
        "model.from_config.max_position_embeddings=64", "data.seq_len=64"]


def tiny_model(recipe, folder=None):
    from transformers import AutoModelForCausalLM

    from seqpar.train.model import base_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(base_config(recipe))
    if folder is not None:
        model.save_pretrained(folder, safe_serialization=True)
    return model


def test_trainable_set_is_exactly_lora_embeddings_and_norms():
    recipe = load_recipe(QUICK, TINY)
    model = apply_lora(tiny_model(recipe), recipe.lora)
    names = set(trainable_parameter_names(model))
    layers = model.config.num_hidden_layers
    expected = {f"base_model.model.model.layers.{i}.self_attn.{p}.lora_{ab}.default.weight"
                for i in range(layers) for p in ("q_proj", "k_proj", "v_proj", "o_proj") for ab in "AB"}
    wrapped = ["model.embed_tokens", "model.norm"] + [
        f"model.layers.{i}.{n}" for i in range(layers) for n in ("input_layernorm", "post_attention_layernorm")]
    expected |= {f"base_model.model.{m}.modules_to_save.default.weight" for m in wrapped}
    assert names == expected
    trainable, total = count_parameters(model)
    assert 0 < trainable < total
    # Without the extras only LoRA trains (plain LoRA), and the MLP / lm_head stay frozen in both cases.
    recipe.lora.trainable = []
    plain = set(trainable_parameter_names(apply_lora(tiny_model(recipe), recipe.lora)))
    assert plain and all(".lora_" in n for n in plain)


@pytest.mark.parametrize("extras", [["embed", "norm"], []])
def test_merged_checkpoint_logits_equal_the_lora_model(tmp_path, extras):
    recipe = load_recipe(QUICK, [*TINY, "rope_scaling.factor=4"])
    recipe.lora.trainable = extras
    base = tmp_path / "base"
    tiny_model(recipe, base)
    from seqpar.train.model import load_model

    lora = apply_lora(load_model(recipe, base).float(), recipe.lora)
    torch.manual_seed(1)
    with torch.no_grad():  # a trained adapter: B != 0, extras moved away from the base
        for p in lora.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000001"
    lora.save_pretrained(ckpt / "adapter", safe_serialization=True)
    save_recipe(recipe, ckpt / "recipe.yaml")
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 1, "base_model": str(base)}))
    (ckpt / MARKER).write_text("ok\n")
    out = merge_lora(tmp_path / "run", tmp_path / "merged")  # finds the newest complete checkpoint

    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert merged.config.rope_parameters["rope_type"] == "linear" and merged.config.rope_parameters["factor"] == 4
    assert not any("lora" in k for k in merged.state_dict())
    ids = torch.randint(3, 259, (2, 64))
    with torch.no_grad():
        want, got = lora.eval()(ids).logits, merged(ids).logits
        moved = (want - load_model(recipe, base).float()(ids).logits).abs().max()
    err = (got - want).abs().max() / want.abs().max()
    assert err <= 1e-5, f"merged vs LoRA logits: relative error {err:.2e}"
    assert moved > 1e-2  # the adapter really changed the model, so equality above is not trivial
