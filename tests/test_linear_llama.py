"""Linear-Llama and the hybrid (LASP-2H) model: built from a config, saved and loaded with
``from_pretrained``, and trained one step under sequence parallelism (SP = 2, 4) with the same loss and
every parameter's gradient as in one process (float32).

One spawn per world size: every rank loads each saved model, computes the single-device reference on the
whole sequence, then its SP shard; loss = Σ token losses over the group / total tokens, gradients summed
over the group.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from huggingface_hub.errors import StrictDataclassClassValidationError
from transformers import AutoConfig, AutoModelForCausalLM

from seqpar.models.linear_llama import LinearLlamaConfig, LinearLlamaForCausalLM
from seqpar.sharding import position_ids, shard
from tests.dist import run_ranks

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
            initializer_range=0.2, linear_block_size=8)  # large init: attention must matter to the loss
CONFIGS = {
    "linear": dict(num_hidden_layers=2, linear_feature_map="silu", linear_decay="tnl"),
    "linear_identity": dict(num_hidden_layers=2, linear_feature_map="identity", linear_output_norm=False,
                            linear_decay="tnl", initializer_range=0.1),
    "linear_learned_decay": dict(num_hidden_layers=2, linear_feature_map="silu", linear_decay="learned"),
    "hybrid": dict(num_hidden_layers=4, layer_types=["linear", "linear", "linear", "softmax"],
                   linear_feature_map="elu1", linear_decay=None),
}
B, L = 2, 64
TOL = 1e-4  # float32 through 2-4 layers of sums over 64 tokens, relative to each tensor's scale


def _loss_and_grads(model, ids, labels, pos, group, total):
    model.zero_grad()
    logits = model(input_ids=ids, position_ids=pos).logits
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum") / total
    loss.backward()
    loss = loss.detach()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    if group is not None:  # loss summed over the group; each rank's gradient is its tokens' share
        dist.all_reduce(loss, group=group)
        for g in grads.values():
            dist.all_reduce(g, group=group)
    return loss, grads


def _check_model(rank, world, group, path) -> dict:
    model = AutoModelForCausalLM.from_pretrained(path)
    assert isinstance(model, LinearLlamaForCausalLM)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (B, L), generator=gen)
    labels = torch.cat([ids[:, 1:], torch.full((B, 1), -100)], dim=1)  # shifted on the WHOLE sequence
    total = (labels != -100).sum()
    ref_loss, ref_grads = _loss_and_grads(model, ids, labels, torch.arange(L).expand(B, -1), None, total)

    model.set_sequence_parallel(group, layout="contiguous")
    local = [shard(t, group=group, layout="contiguous") for t in (ids, labels)]
    pos = position_ids(L, group=group, layout="contiguous").expand(B, -1)
    loss, grads = _loss_and_grads(model, local[0], local[1], pos, group, total)
    grad_err = {n: ((grads[n] - g).abs().max() / g.abs().max()).item() for n, g in ref_grads.items()}
    return {"loss": (loss.item(), ref_loss.item()), "grad_err": grad_err}


def _zigzag_error(rank, world, group, path) -> str | None:
    model = AutoModelForCausalLM.from_pretrained(path)
    try:
        model.set_sequence_parallel(group, layout="zigzag")
    except ValueError as err:
        return str(err)
    return None


def _all_checks(rank: int, world: int, group, paths: dict) -> dict:
    out = {name: _check_model(rank, world, group, path) for name, path in paths.items()}
    out["zigzag_error"] = _zigzag_error(rank, world, group, paths["hybrid"])
    return out


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    paths = {}
    for name, overrides in CONFIGS.items():
        torch.manual_seed(0)
        model = LinearLlamaForCausalLM(LinearLlamaConfig(**{**TINY, **overrides}))
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        paths[name] = str(path)
    return paths


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"SP{w}")
def sp_results(request, saved_models):
    return request.param, run_ranks(_all_checks, request.param, args=(saved_models,))


def test_save_and_load_from_local_folder(saved_models):
    cfg = AutoConfig.from_pretrained(saved_models["hybrid"])
    assert isinstance(cfg, LinearLlamaConfig) and cfg.model_type == "linear_llama"
    assert cfg.layer_types == ["linear_attention"] * 3 + ["full_attention"]  # aliases stored in HF vocabulary
    torch.manual_seed(0)
    fresh = LinearLlamaForCausalLM(LinearLlamaConfig(**{**TINY, **CONFIGS["hybrid"]}))
    loaded = AutoModelForCausalLM.from_pretrained(saved_models["hybrid"])
    assert type(loaded) is LinearLlamaForCausalLM
    fresh_state = fresh.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, fresh_state[name]), name


def test_config_errors_name_the_field():
    # transformers' strict configs wrap the ValueError of validate_architecture, keeping its message
    bad = (ValueError, StrictDataclassClassValidationError)
    with pytest.raises(bad, match="linear_feature_map='relu'"):
        LinearLlamaConfig(**TINY, num_hidden_layers=2, linear_feature_map="relu")
    with pytest.raises(bad, match="layer_types"):
        LinearLlamaConfig(**TINY, num_hidden_layers=2, layer_types=["linear", "sliding_attention"])
    with pytest.raises(bad, match="layer_types"):
        LinearLlamaConfig(**TINY, num_hidden_layers=2, layer_types=["linear"])
    with pytest.raises(bad, match="linear_decay"):
        LinearLlamaConfig(**TINY, num_hidden_layers=2, linear_decay="alibi")


def test_sequence_parallel_loss_and_gradients_match_one_process(sp_results):
    _, results = sp_results
    for name in CONFIGS:
        for rank, res in enumerate(results):
            loss, ref = res[name]["loss"]
            assert abs(loss - ref) <= TOL * abs(ref), (name, rank, loss, ref)
            worst = max(res[name]["grad_err"].items(), key=lambda kv: kv[1])
            assert worst[1] <= TOL, (name, rank, worst)


def test_linear_layers_reject_zigzag(sp_results):
    _, results = sp_results
    for res in results:
        assert res["zigzag_error"] is not None and "layout='contiguous'" in res["zigzag_error"]


def test_patch_model_runs_linear_llama_through_the_registry():
    """"lasp2" goes through patch_model like every attention (the trainer has no lasp2 branch); a softmax
    attention on Linear-Llama, or lasp2 on Llama, is refused naming the attentions that fit."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from seqpar.models import patch_model, patched_layout, unpatch_model

    cfg = LinearLlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=64, layer_types=["linear", "softmax"])
    model, ids = LinearLlamaForCausalLM(cfg), torch.randint(0, 64, (1, 16))
    plain = model(input_ids=ids).logits
    patch_model(model, "lasp2", None)
    assert patched_layout(model) == "contiguous"
    assert torch.equal(model(input_ids=ids).logits, plain)
    unpatch_model(model)
    with pytest.raises(ValueError, match="'lasp2',"):
        patch_model(model, "ring", None)
    llama = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
    with pytest.raises(ValueError, match="'ring', 'rsa'"):
        patch_model(llama, "lasp2", None)
