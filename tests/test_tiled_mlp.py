"""Tiled MLP (DeepSpeed's TiledMLP under seqpar.models.tile_mlp) and checkpoint offload: one device,
outputs and every parameter gradient equal with and without, for Llama, Mistral, Qwen2 and Linear-Llama,
with gradient checkpointing; and both are shown engaged (MLP tiles recomputed, the MLP's largest
activation one tile long; the offloading checkpoint called per layer)."""

from __future__ import annotations

import pytest
import torch

from seqpar.kernels.reference import rel_err
from seqpar.models.tiled_mlp import tile_mlp, untile_mlp
from tests.test_fused_loss import LargestTensor

COMMON = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 96, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2}
B, L, CHUNK = 2, 40, 16  # 3 tiles, the last one ragged


def _model(kind: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    from seqpar.models.linear_llama import LinearLlamaConfig, LinearLlamaForCausalLM

    torch.manual_seed(0)
    if kind == "linear_llama":
        return LinearLlamaForCausalLM(LinearLlamaConfig(**COMMON))
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **COMMON))


def _step(model, ids):
    model.zero_grad(set_to_none=True)
    counter = LargestTensor()
    with counter:
        logits = model(input_ids=ids, use_cache=False).logits
        (logits.float().square().mean() * 3).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, counter.largest


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3", "gemma3_text", "linear_llama"])
def test_tiled_mlp_and_offload_equal_plain(kind, monkeypatch):
    from seqpar.models import offload

    model = _model(kind)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = torch.randint(0, 64, (B, L), generator=torch.Generator().manual_seed(1))
    out0, g0, _ = _step(model, ids)
    calls = []
    mlp = model.model.layers[0].mlp
    mlp.gate_proj.register_forward_hook(lambda *a: calls.append(a[1][0].shape[-2]))
    assert tile_mlp(model, chunk_size=CHUNK) == COMMON["num_hidden_layers"]
    used = []
    real = offload.offloaded_checkpoint
    monkeypatch.setattr(offload, "offloaded_checkpoint", lambda *a, **k: used.append(1) or real(*a, **k))
    assert offload.enable_checkpoint_offload(model, force=True)
    out1, g1, _ = _step(model, ids)
    # 3 tiles in the forward, 3 in the checkpoint's recomputation, 3 in TiledMLP's backward (which tiles the
    # B x L rows: up to 2 x 14 here); never the whole [B, L] at once.
    assert len(calls) == 9 and max(calls) < B * L / 2, calls
    assert len(used) == COMMON["num_hidden_layers"]
    assert rel_err(out1.double(), out0.double()) < 1e-6
    for n in g0:
        assert rel_err(g1[n].double(), g0[n].double()) < 1e-5, n
    assert untile_mlp(model) == COMMON["num_hidden_layers"]
    calls.clear()
    _step(model, ids)
    assert max(calls) == L  # untiled: the whole shard at once again


def test_tile_mlp_errors():
    with pytest.raises(ValueError, match="positive"):
        tile_mlp(_model("llama"), chunk_size=0)
    with pytest.raises(ValueError, match="no LlamaMLP"):
        tile_mlp(torch.nn.Linear(2, 2))
    assert not __import__("seqpar.models.offload", fromlist=["x"]).enable_checkpoint_offload(_model("llama")) \
        or torch.cuda.is_available()  # without CUDA: a no-op
