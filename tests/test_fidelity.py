"""``seqpar bench fidelity``: the quick pipeline runs end to end and every method trained with its own
attention; the per-position perplexity sums to ``seqpar eval``'s; ``attention.s2_wrap`` reaches the kernel
and computes LongLoRA's rolled S2-Attn (against an independent roll-and-mask reference, float64)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from seqpar.train.recipe import RecipeError, load_recipe
from seqpar.train.validate import validate

ROOT = Path(__file__).resolve().parents[1]


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)
    return LlamaForCausalLM(config).double()


def rolled_s2(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """LongLoRA's pseudocode, written independently: roll the second half of the heads by -G/2, causal
    attention inside groups of G = L/4, roll back. ``query [B, H, L, D]`` -> ``[B, L, H, D]``."""
    _, H, L, D = query.shape
    G = L // 4
    q, k, v = (torch.cat([t[:, : H // 2], t[:, H // 2 :].roll(-G // 2, dims=2)], dim=1) for t in (query, key, value))
    i = torch.arange(L)
    allowed = (i[:, None] // G == i[None, :] // G) & (i[None, :] <= i[:, None])
    scores = (q @ k.transpose(-1, -2)) * (scaling if scaling is not None else D**-0.5)
    out = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ v
    out = torch.cat([out[:, : H // 2], out[:, H // 2 :].roll(G // 2, dims=2)], dim=1)
    return out.transpose(1, 2).contiguous(), None


def test_s2_wrap_reaches_the_kernel():
    from transformers import AttentionInterface

    from seqpar.models import attention_calls, patch_model

    ids = torch.randint(0, 64, (2, 64), generator=torch.Generator().manual_seed(1))
    AttentionInterface.register("test_rolled_s2", rolled_s2)
    ref = tiny_llama()
    ref.set_attn_implementation("test_rolled_s2")
    expected = ref.train()(input_ids=ids).logits
    logits = {}
    for wrap in (True, False):
        model = patch_model(tiny_llama(), "s2", None, group_size_ratio=0.25, s2_wrap=wrap).train()
        logits[wrap] = model(input_ids=ids).logits
        assert attention_calls(model) == {"s2": 2}
    torch.testing.assert_close(logits[True], expected, rtol=1e-10, atol=1e-10)
    assert (logits[False] - expected).abs().max() > 1e-3  # the no-wrap default is another attention


def test_s2_wrap_only_with_s2():
    recipe = load_recipe(ROOT / "recipes" / "quickstart-cpu.yaml", ["attention.name=sf", "attention.s2_wrap=true"])
    with pytest.raises(RecipeError, match=r"attention\.s2_wrap=true with attention\.name='sf'"):
        validate(recipe, world_size=2)
    validate(load_recipe(ROOT / "recipes" / "quickstart-cpu.yaml", ["attention.s2_wrap=true"]), world_size=2)


def test_position_nll_sums_to_sliding_window_perplexity():
    from seqpar.bench.fidelity import position_nll
    from seqpar.eval.perplexity import sliding_window_nll

    model = tiny_llama().eval()
    ids = torch.randint(0, 64, (300,), generator=torch.Generator().manual_seed(2))
    nll, count = position_nll(model, ids, context=64)
    total, n = sliding_window_nll(model, ids, context=64, stride=64)
    assert int(count.sum()) == n and math.isclose(float(nll.sum()), total, rel_tol=1e-9)
    assert count[0] == 0 and count[1:].min() >= 4  # position 0 is never scored; the others in every window


@pytest.mark.parametrize("name", ["pretrain", "extend-full", "extend-s2", "extend-sf"])
def test_fidelity_recipes_resolve(name):
    recipe = load_recipe(ROOT / "recipes" / "fidelity" / f"{name}.yaml",
                         ["model.path=null", "model.from_config={model_type: llama, num_attention_heads: 4, "
                          "num_key_value_heads: 4, hidden_size: 128, max_position_embeddings: 256}"]
                         if name != "pretrain" else [])
    validate(recipe, world_size=2)


def test_quick_pipeline(tmp_path):
    """The whole experiment at minimum size (pre-training + full/s2/sf extension under torchrun + evaluation)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    out = tmp_path / "fid"
    proc = subprocess.run([sys.executable, "-m", "seqpar", "bench", "fidelity", "--quick", "--seeds", "1",
                           "--out", str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    res = json.loads((out / "fidelity.json").read_text())
    assert {r["method"] for r in res["runs"]} == {"base", "full", "s2", "sf"}
    for r in res["runs"]:
        assert math.isfinite(r["ppl"]) and len(r["buckets"]) == 4 and set(r["passkey"]) == {"128", "256", "512"}
        if r["method"] != "base":  # each method trained with the attention it names, at every step
            assert set(r["attention_calls"]) == {r["method"]} and r["attention_calls"][r["method"]] == 2 * r["steps"]
    assert res["summary"]["full"]["recovered"][0] == pytest.approx(1.0) and math.isfinite(res["pretrain"]["ppl_at_l0"])
    assert (out / "fidelity.png").stat().st_size > 0 and "| s2 |" in proc.stdout
