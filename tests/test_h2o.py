"""H2O heavy-hitter KV cache: exact when the budget covers everything, bounded otherwise, and it keeps exactly the
top-`heavy` accumulated-attention tokens plus the `recent` last ones (checked against a loop-based float64 model)."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

from seqpar.inference import H2O_ATTENTION, H2OCache, h2o_attention

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    """Tiny random Llama / Mistral / Qwen2 (GQA 4:2) saved to disk; loaded back with from_pretrained."""
    from transformers import AutoConfig

    paths = {}
    for name, cfg_cls in (("llama", LlamaConfig), ("mistral", MistralConfig), ("qwen2", Qwen2Config)):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg_cls(**SMALL))
        paths[name] = tmp_path_factory.mktemp(name)
        model.save_pretrained(paths[name])
        assert AutoConfig.from_pretrained(paths[name]).model_type == name
    return paths


def _load(path, attn):
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn, dtype=torch.float64).eval()


def _generate(model, ids, mask, cache=None, new=8):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5 renames past_key_values -> cache
        kw = {} if cache is None else {"past_key_values": cache}
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0,
                             output_scores=True, return_dict_in_generate=True, **kw)
    return out.sequences, torch.stack(out.scores)


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2"])
def test_full_budget_equals_default_cache(saved_models, name):
    base, h2o = _load(saved_models[name], "sdpa"), _load(saved_models[name], H2O_ATTENTION)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 64, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # row 1 is left-padded: padding must stay masked through the cache
    ref_seq, ref_logits = _generate(base, ids, mask)
    seq, logits = _generate(h2o, ids, mask, H2OCache(heavy=10, recent=10))  # 10 + 10 >= 12 + 8
    assert torch.equal(seq, ref_seq)
    assert (logits - ref_logits).abs().max() < 1e-10


def test_small_budget_bounds_every_layer(saved_models):
    model = _load(saved_models["llama"], H2O_ATTENTION)
    heavy, recent = 3, 2
    cache = H2OCache(heavy=heavy, recent=recent)
    lengths = []
    hook = model.register_forward_hook(lambda m, a, out: lengths.append([lay.keys.shape[-2] for lay in cache.layers]))
    ids = torch.randint(1, 64, (2, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding: never worth a heavy slot
    seq, _ = _generate(model, ids, mask, cache, new=10)
    hook.remove()
    assert seq.shape == (2, 22)
    assert len(lengths) == 10 and all(n == [heavy + recent] * 2 for n in lengths)
    assert cache.get_seq_length() == 21  # positions keep counting: RoPE sees true absolute positions
    for layer in cache.layers:
        assert layer.keys.shape == (2, 2, heavy + recent, 8) and layer.values.shape == layer.keys.shape
        pos = layer.positions
        assert torch.equal(pos[..., -recent:], torch.tensor([19, 20]).expand(2, 2, 2))
        assert (pos[..., :heavy] < 19).all() and (pos.diff(dim=-1) > 0).all()
        assert (pos[1] >= 3).all() and layer.valid.all()


def test_errors(saved_models):
    for bad in (dict(heavy=-1, recent=4), dict(heavy=2.5, recent=4), dict(heavy=0, recent=0)):
        with pytest.raises(ValueError, match=r"heavy|recent"):
            H2OCache(**bad)
    model = _load(saved_models["llama"], "sdpa")  # no probabilities -> H2O cannot score: must say what to do
    ids = torch.randint(1, 64, (1, 6))
    with pytest.raises(RuntimeError, match=f"attn_implementation='{H2O_ATTENTION}'"):
        _generate(model, ids, torch.ones_like(ids), H2OCache(heavy=2, recent=2), new=3)


def _reference_step(state, q, k, v, heavy, recent, scale):
    """Loop-based H2O in float64: returns out [B, Lq, H, D]; updates state (kept positions and scores)."""
    B, H, Lq, D = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    state["k"].append(k)
    state["v"].append(v)
    allk, allv = torch.cat(state["k"], 2), torch.cat(state["v"], 2)
    start = allk.shape[2] - Lq
    out = torch.zeros(B, Lq, H, D, dtype=torch.float64)
    for b in range(B):
        for hk in range(Hkv):
            pos = state["kept"][b][hk] + list(range(start, start + Lq))
            for g in range(G):
                h = hk * G + g
                logits = q[b, h] @ allk[b, hk, pos].T * scale
                visible = torch.tensor([[p <= start + i for p in pos] for i in range(Lq)])
                p = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
                out[b, :, h] = p @ allv[b, hk, pos]
                for j, tok in enumerate(pos):
                    state["score"][b][hk][tok] = state["score"][b][hk].get(tok, 0.0) + p[:, j].sum().item()
            if len(pos) > heavy + recent:
                old = pos[: len(pos) - recent]
                top = sorted(old, key=lambda t: -state["score"][b][hk][t])[:heavy]
                pos = sorted(top) + pos[len(pos) - recent :]
            state["kept"][b][hk] = pos
    return out


def test_kept_set_is_top_heavy_plus_recent():
    B, H, Hkv, D, heavy, recent = 2, 4, 2, 8, 3, 2
    g = torch.Generator().manual_seed(3)
    cache = H2OCache(heavy=heavy, recent=recent)
    module = torch.nn.Module().eval()
    state = {"k": [], "v": [], "kept": [[[] for _ in range(Hkv)] for _ in range(B)],
             "score": [[{} for _ in range(Hkv)] for _ in range(B)]}
    for Lq in (7, 1, 1, 3, 1, 1, 2):  # prefill, decode steps and multi-token chunks
        q = torch.randn(B, H, Lq, D, generator=g, dtype=torch.float64) * 2  # peaked softmax: distinct scores
        k, v = (torch.randn(B, Hkv, Lq, D, generator=g, dtype=torch.float64) for _ in range(2))
        kw = {}
        keys, values = cache.update(k, v, 0, kwargs=kw)
        out, _ = h2o_attention(module, q, keys, values, None, scaling=D**-0.5, **kw)
        ref = _reference_step(state, q, k, v, heavy, recent, D**-0.5)
        layer = cache.layers[0]
        assert (out - ref).abs().max() < 1e-12
        for b in range(B):
            for hk in range(Hkv):
                kept = state["kept"][b][hk]
                assert layer.positions[b, hk].tolist() == kept
                want = torch.tensor([state["score"][b][hk][t] for t in kept], dtype=torch.float64)
                assert (layer.scores[b, hk] - want).abs().max() < 1e-12
                assert torch.equal(layer.keys[b, hk], torch.cat(state["k"], 2)[b, hk, kept])
    assert layer.keys.shape[-2] == heavy + recent and cache.get_seq_length() == 16


def test_left_padding_with_eviction_equals_unpadded_row(saved_models):
    """A left-padded row under a small budget generates what the same row does alone: padding never takes a
    heavy slot, padded queries add no score, and kept tokens keep their padding flag after eviction."""
    model = _load(saved_models["llama"], H2O_ATTENTION)
    ids = torch.randint(1, 64, (2, 12), generator=torch.Generator().manual_seed(4))
    for pad in (4, 9):  # 9: too few real tokens, so a (masked) padding token must fill a heavy slot
        mask = torch.ones_like(ids)
        mask[1, :pad] = 0
        seq, logits = _generate(model, ids, mask, H2OCache(heavy=3, recent=2), new=8)
        alone, alone_logits = _generate(model, ids[1:, pad:], mask[1:, pad:], H2OCache(heavy=3, recent=2), new=8)
        assert torch.equal(seq[1, pad:], alone[0])
        assert (logits[:, 1] - alone_logits[:, 0]).abs().max() < 1e-10
