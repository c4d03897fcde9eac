"""Every causal LM class of the installed transformers, built tiny from its own config.

``tiny_config(model_type)`` shrinks the class's default config (and its text sub-configs) to a few layers of
width 64 and a vocabulary of 128, keeping what makes the family what it is (its layer types, windows, sinks,
experts, convolutions); sliding windows (24 tokens) and attention chunks (16) are set wherever the config
has them, so that the 64-token sweep engages them. ``build(model_type)`` returns the float32 model, or raises
``Unbuildable`` for a class whose tiny config does not build (the sweep reports those separately; they are
not silently skipped).
Used by ``tests/test_model_families.py``, which runs each one patched at SP = 2 against the unpatched model.
"""

from __future__ import annotations

import contextlib
import io
import warnings

import torch

VOCAB = 128

_SET = {  # attribute -> tiny value, applied wherever the config (or a sub-config) has the attribute
    "hidden_size": 64, "d_model": 64, "n_embd": 64, "n_embed": 64, "embed_dim": 64, "dim": 64,
    "num_attention_heads": 4, "n_head": 4, "n_heads": 4, "num_heads": 4, "encoder_attention_heads": 4,
    "decoder_attention_heads": 4, "num_key_value_heads": 2, "n_kv_heads": 2, "num_kv_heads": 2,
    "head_dim": 16, "kv_channels": 16, "attention_head_dim": 16,
    "intermediate_size": 128, "ffn_dim": 128, "n_inner": 128, "encoder_ffn_dim": 128, "decoder_ffn_dim": 128,
    "ffn_hidden_size": 128, "mlp_dim": 128,
    "vocab_size": VOCAB, "max_position_embeddings": 256, "n_positions": 256, "n_ctx": 256,
    "max_seq_len": 256, "seq_length": 256,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "num_experts_per_token": 2, "moe_topk": 2, "top_k": 2, "moe_k": 2,
    "moe_intermediate_size": 32, "expert_intermediate_size": 32, "shared_expert_intermediate_size": 32,
    "n_shared_experts": 1, "num_shared_experts": 1, "n_group": 1, "topk_group": 1,
    "kv_lora_rank": 16, "q_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 12,
    "qk_head_dim": 16, "index_head_dim": 16, "index_n_heads": 2, "index_topk": 16,
    "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16,
    "linear_value_head_dim": 16, "linear_num_heads": 4, "linear_head_dim": 16,
    "state_size": 8, "ssm_state_size": 8, "mamba_d_state": 8,
    "mamba_n_heads": 4, "mamba_head_dim": 16, "mamba_d_head": 16, "mamba_expand": 2, "expand": 2, "mamba_d_ssm": 128,
    "n_groups": 1, "mamba_n_groups": 1, "time_step_rank": 8, "mamba_dt_rank": 8,
    "lru_width": 64, "attention_window_size": 4096, "block_size": 16, "chunk_size": 16,
    "encoder_layers": 2, "decoder_layers": 2, "first_k_dense_replace": 1,
    "num_nextn_predict_layers": 0, "mtp_num_hidden_layers": 0,
    "attention_dropout": 0.0, "attn_pdrop": 0.0, "dropout": 0.0, "hidden_dropout": 0.0,
    "resid_pdrop": 0.0, "embd_pdrop": 0.0, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
    "activation_dropout": 0.0, "attention_dropout_prob": 0.0, "summary_first_dropout": 0.0,
    "tie_word_embeddings": False, "use_cache": False,
}
_TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id", "sep_token_id",
              "cls_token_id", "mask_token_id", "unk_token_id", "image_token_id", "image_token_index",
              "video_token_id", "audio_token_id", "boi_token_id", "eoi_token_id", "eod_token_id")
N_LAYERS = 4  # enough for a hybrid's pattern (linear, attention) to show both kinds
# Windows and chunks shorter than the sweep's 64 tokens, wherever a config has them: a model whose window
# seqpar dropped (one kept only in transformers' mask, say) shows up as accepted and wrong.
WINDOW, CHUNK = 24, 16
_ENGAGE = {"sliding_window": WINDOW, "use_sliding_window": True, "attention_chunk_size": CHUNK}


class Unbuildable(Exception):
    """The tiny config of this class does not build (reported by the sweep, never skipped silently)."""


def _shrink(cfg, seen: set) -> None:
    if id(cfg) in seen:
        return
    seen.add(id(cfg))
    for name, value in _SET.items():
        if name in vars(cfg) and (vars(cfg)[name] is None or isinstance(vars(cfg)[name], type(value))):
            setattr(cfg, name, value)
    for name in ("sliding_window", "attention_chunk_size"):  # sub-configs too (their layer types are set)
        if name in vars(cfg):
            setattr(cfg, name, _ENGAGE[name])
    for name, value in list(vars(cfg).items()):  # the sweep compares deterministic runs: no dropout, no jitter
        if isinstance(value, float) and any(w in name for w in ("dropout", "pdrop", "jitter", "drop_path")):
            setattr(cfg, name, 0.0)
    for name in _TOKEN_IDS:
        value = vars(cfg).get(name)
        if isinstance(value, int) and value >= VOCAB - 8:
            setattr(cfg, name, VOCAB - 1 - _TOKEN_IDS.index(name))
        elif isinstance(value, list):
            setattr(cfg, name, [min(v, VOCAB - 1) for v in value if isinstance(v, int)][:1] or None)
    for name in ("num_hidden_layers", "n_layer", "n_layers", "num_layers"):
        if isinstance(vars(cfg).get(name), int):
            setattr(cfg, name, min(vars(cfg)[name], N_LAYERS))
    for name in ("layer_types", "layers_block_type", "hybrid_override_pattern", "block_types", "layer_type"):
        value = vars(cfg).get(name)
        if isinstance(value, (list, tuple)) and len(value) > N_LAYERS:
            kinds = list(dict.fromkeys(value))  # keep one of each kind, in the order of first appearance
            short = (kinds + [value[0]] * N_LAYERS)[:N_LAYERS]
            setattr(cfg, name, type(value)(short) if isinstance(value, list) else tuple(short))
        elif isinstance(value, str) and len(value) > N_LAYERS:
            kinds = "".join(dict.fromkeys(value))
            setattr(cfg, name, (kinds + value[0] * N_LAYERS)[:N_LAYERS])
    d = vars(cfg)
    if isinstance(d.get("qk_rope_head_dim"), int) and "head_dim" in d:  # MLA: RoPE runs on the rope part
        cfg.head_dim = d["qk_rope_head_dim"]
        if "num_key_value_heads" in d:
            cfg.num_key_value_heads = d.get("num_attention_heads", 4)
    if isinstance(d.get("full_attn_idxs"), list):  # LFM2: which layers attend (the others are short convs)
        cfg.full_attn_idxs = [1, 3]
    for heads, width, expand in (("num_heads", "head_dim", "expand"), ("mamba_n_heads", "mamba_d_head",
                                                                        "mamba_expand")):
        if all(isinstance(d.get(a), int) for a in (heads, width, expand)) and "hidden_size" in d:
            setattr(cfg, width, d[expand] * d["hidden_size"] // d[heads])  # Mamba2: heads x width = inner
    if isinstance(d.get("rotary_dim"), int):
        cfg.rotary_dim = 8
    for value in list(vars(cfg).values()):
        if hasattr(value, "to_dict") and hasattr(value, "model_type"):
            _shrink(value, seen)


def tiny_config(model_type: str):
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(model_type)
    engage = {k: v for k, v in _ENGAGE.items() if k in vars(cfg)}
    if engage:  # rebuilt, so that __post_init__ derives the layer types from the window (Qwen2, Qwen3...)
        cfg = AutoConfig.for_model(model_type, **engage)
    _shrink(cfg, set())
    return cfg


def causal_lm_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def build(model_type: str, seed: int = 0) -> torch.nn.Module:
    """The tiny float32 causal LM of ``model_type`` in train mode (eager attention), or ``Unbuildable``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            cfg = tiny_config(model_type)
            model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    except Exception as err:  # any failure to build is reported by name
        first = str(err).splitlines()[0][:160] if str(err) else ""
        raise Unbuildable(f"{model_type}: {type(err).__name__}: {first}") from None
    n_params = sum(p.numel() for p in model.parameters())
    if n_params > 20_000_000:
        raise Unbuildable(f"{model_type}: {n_params / 1e6:.0f}M parameters after shrinking")
    return model.train()
