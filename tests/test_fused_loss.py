"""Tiled LM head + loss (seqpar.models.fused_loss): value and gradients of hidden, weight and bias against
``sp_cross_entropy`` on full logits and against a float64 one-device reference, at W = 1, 2, 3, 4 in one
spawn (float32 1e-5, bf16 2e-2); the largest tensor it creates is a chunk, never ``[L/N, V]``; through a
Hugging Face model with tied embeddings, peft LoRA (+ a trained lm_head copy) and gradient checkpointing.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from seqpar.kernels.reference import rel_err
from seqpar.models import causal_lm_loss, sp_cross_entropy, sp_fused_linear_cross_entropy
from seqpar.models.fused_loss import FusedHeadError
from seqpar.sharding import shard
from tests.sp_harness import spawn_worlds

B, LQ, D, V, CHUNK = 2, 10, 8, 50, 7  # chunk 7 does not divide the 20 rows of a rank: a ragged last tile


class LargestTensor(TorchDispatchMode):
    """Counts the largest tensor any op creates (numel), to show the logits never exist."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def _inputs(world: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    L = LQ * world
    hidden = torch.randn(B, L, D, generator=g, dtype=torch.float64)
    weight = torch.randn(V, D, generator=g, dtype=torch.float64) / D**0.5
    bias = torch.randn(V, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (B, L), generator=g)
    labels[torch.rand(B, L, generator=g) < 0.3] = -100
    labels[0, :LQ] = -100  # rank 0's first row has no target at all
    return hidden, weight, bias, labels


def _reference(hidden, weight, bias, labels):
    """float64, one device, the whole sequence: mean cross-entropy of the non-ignored tokens."""
    h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    loss = F.cross_entropy((h @ w.T + b).flatten(0, 1), labels.flatten(), ignore_index=-100)
    loss.backward()
    return loss.detach(), h.grad, w.grad, b.grad


def _run(kind: str, hidden, weight, bias, labels, group, dtype):
    h, w, b = (t.to(dtype).requires_grad_() for t in (hidden, weight, bias))
    counter = LargestTensor()
    with counter:
        if kind == "fused":
            loss = sp_fused_linear_cross_entropy(h, w, labels, group, bias=b, chunk_size=CHUNK)
        else:
            loss = sp_cross_entropy(h @ w.T + b, labels, group)
        (3.0 * loss).backward()  # an incoming gradient != 1 (the trainer backpropagates S x loss)
    grads = [w.grad.double(), b.grad.double()]
    for t in grads if group is not None else []:
        dist.all_reduce(t, group=group)  # the contract: summing parameter grads over SP = one device
    return loss.detach().double(), h.grad.double() / 3, grads[0] / 3, grads[1] / 3, counter.largest


def check(rank, world, group):
    out = {}
    for layout in ("zigzag", "contiguous"):
        hidden, weight, bias, labels = _inputs(world, seed=world)
        ref = _reference(hidden, weight, bias, labels)
        local_h, local_y = (shard(t, layout=layout, rank=rank, world_size=world) for t in (hidden, labels))
        ref_h = shard(ref[1], layout=layout, rank=rank, world_size=world)
        for dtype in (torch.float32, torch.bfloat16):
            runs = {k: _run(k, local_h, weight, bias, local_y, group, dtype) for k in ("fused", "logits")}
            for kind, (loss, dh, dw, db, largest) in runs.items():
                out[(layout, str(dtype), kind)] = {
                    "loss": rel_err(loss, ref[0]), "dh": rel_err(dh, ref_h), "dw": rel_err(dw, ref[2]),
                    "db": rel_err(db, ref[3]), "largest": largest, "logits": local_h[..., 0].numel() * V}
            f, u = runs["fused"], runs["logits"]
            out[(layout, str(dtype), "fused_vs_logits")] = {
                "loss": rel_err(f[0], u[0]), "dh": rel_err(f[1], u[1]), "dw": rel_err(f[2], u[2]),
                "db": rel_err(f[3], u[3])}
    return out


def test_fused_loss_matches_reference_and_never_holds_logits():
    found = spawn_worlds(check)
    for world, ranks in found.items():
        for r in ranks:
            for (layout, dtype, kind), e in r.items():
                tol = 1e-5 if "float32" in dtype else 2e-2
                for name in ("loss", "dh", "dw", "db"):
                    assert e[name] < tol, (world, layout, dtype, kind, name, e)
                if kind == "fused":  # a [CHUNK, V] tile at most; full logits are [B x L/N, V]
                    assert e["largest"] <= max(CHUNK * V, V * D), (world, e)
                    assert e["largest"] < e["logits"], (world, e)
                elif kind == "logits":  # the counter sees the logits when they exist
                    assert e["largest"] >= e["logits"], (world, e)


def _tiny_llama(tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    return LlamaForCausalLM(config)


@pytest.mark.parametrize("variant", ["tied+checkpointing", "lora+trained_head"])
def test_causal_lm_loss_fused_equals_logits_path(variant):
    """Through the model: equal loss and parameter gradients with the head fused or not (one device)."""
    from seqpar.models import shard_batch

    model = _tiny_llama(tied=variant.startswith("tied"))
    if variant.startswith("tied"):
        assert model.lm_head.weight is model.model.embed_tokens.weight
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                 modules_to_save=["lm_head"], task_type="CAUSAL_LM"))
    model.train()
    ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(1))
    sp = shard_batch({"input_ids": ids}, None, "contiguous")
    labels = sp.pop("labels")
    results = []
    for chunk in (None, 7):
        model.zero_grad(set_to_none=True)
        loss = causal_lm_loss(model, sp, labels, None, chunk_size=chunk)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads))
    (l0, g0), (l1, g1) = results
    assert l1.dim() == 0 and abs(float(l1 - l0)) < 1e-6 * abs(float(l0))
    assert g0.keys() == g1.keys() and any("lm_head" in n or "embed" in n for n in g0)
    for n in g0:
        assert rel_err(g1[n].double(), g0[n].double()) < 1e-5, n
    head = model.get_output_embeddings()
    assert "forward" not in vars(head), "the head's forward was not restored"


def test_fused_loss_refuses_lora_on_the_head_and_bad_chunks():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_tiny_llama(tied=False), LoraConfig(r=4, target_modules=["lm_head"]))
    ids = torch.randint(0, 96, (1, 8))
    with pytest.raises(FusedHeadError, match=r"memory\.fused_loss=false"):
        causal_lm_loss(model, {"input_ids": ids}, ids, None, chunk_size=4)
    with pytest.raises(ValueError, match="positive"):
        sp_fused_linear_cross_entropy(torch.randn(1, 4, 8), torch.randn(10, 8), ids[:, :4], None, chunk_size=0)


def test_fused_loss_under_no_grad_is_the_value_only():
    h, w = torch.randn(1, 10, 8, requires_grad=True), torch.randn(2000, 8, requires_grad=True)
    y = torch.randint(0, 2000, (1, 10))
    from seqpar.bench.measure import TrackedPeak

    with torch.no_grad(), TrackedPeak() as tracked:
        value = sp_fused_linear_cross_entropy(h, w, y, None, chunk_size=1)
    with TrackedPeak() as training:
        sp_fused_linear_cross_entropy(h, w, y, None, chunk_size=1)
    assert not value.requires_grad and tracked.peak < w.numel() * 4 <= training.peak  # no d W buffer in eval
    assert torch.allclose(value, sp_cross_entropy(h @ w.T, y, None))
