"""H2O: a KV cache that keeps the heavy hitters plus a recent window (bounded memory for long generation).

Zhang et al. 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models".
Every cached token j carries its accumulated attention mass

    score_j = sum over every query i that has attended to j, and over the q heads sharing j's kv head, of p_ij

and after each forward step a layer keeps, per batch row and per kv head, the last ``recent`` tokens plus the
``heavy`` tokens with the largest score among the older ones. The cache therefore never holds more than
``heavy + recent`` tokens per layer and kv head (it holds ``heavy + recent + new`` transiently, during the step
that attends to the new tokens). GQA: the q heads of one kv group share one kept set, so their scores are summed.

Shapes (transformers' cache layout): keys/values ``[B, Hkv, n, D]``, scores ``[B, Hkv, n]`` (float32 or
float64), absolute positions of the kept tokens ``[B, Hkv, n]``. Keys are cached already rotated by RoPE (as in
H2O's own Hugging Face implementation), so an evicted token leaves no gap in the positions of the others and the
new tokens keep their true absolute positions. Inference only: nothing is communicated (0 bytes per call).

How it plugs into transformers 5 without touching model code: the attention probabilities are needed, so the
model runs the registered attention function ``"seqpar_h2o"`` (explicit softmax, like eager attention). The
model's attention calls ``cache.update(k, v, layer_idx, kwargs=kwargs)`` and then the attention function with
``**kwargs``; ``update`` puts the layer into that dict, so the attention function finds the layer whose keys it
was given, adds the new probabilities to its scores and evicts. Works for Llama, Mistral, Qwen2, Qwen3, Gemma
(every model whose attention passes its kwargs to ``cache.update``).

Example::

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=H2O_ATTENTION)
    out = model.generate(ids, max_new_tokens=64, past_key_values=H2OCache(heavy=64, recent=64))
    # transformers >= 5.2x also accepts (and prefers) cache=H2OCache(...); past_key_values= warns but works.

Commands: ``seqpar generate MODEL --cache h2o --heavy N --recent N`` and ``seqpar eval MODEL --cache h2o ...``
check their flags with ``seqpar.inference.generate.cache_budget`` and build the cache with ``new_cache`` (which
switches the model to the attention above); ``kv_footprint`` reports what a cache holds.

Limits: sliding-window layers see the kept tokens as the last ``kept`` positions (exact until eviction starts);
no crop(), so no assisted/speculative decoding; beam search reorders the scores with the keys.
"""

from __future__ import annotations

from typing import Any

import torch
import transformers.utils.generic as hf_generic
from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicLayer
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

H2O_ATTENTION = "seqpar_h2o"
_LAYER_KEY = "seqpar_h2o_layer"  # the key under which `update` hands the layer to the attention function
# The keyword (and output key) that carries a cache: transformers 5.2x renamed past_key_values -> cache and warns on
# the old name; earlier releases know only past_key_values.
CACHE_KWARG = "cache" if hasattr(hf_generic, "_rename_kwargs_for_bc") else "past_key_values"


class H2OLayer(DynamicLayer):
    """One layer's heavy-hitter cache: keys/values plus each kept token's score, validity and position."""

    is_croppable = False  # evicted tokens cannot be restored

    def __init__(self, heavy: int, recent: int):
        super().__init__()
        self.heavy, self.recent = heavy, recent
        self.cumulative_length = 0  # tokens seen so far: the position of the next token
        self.scores: torch.Tensor | None = None  # [B, Hkv, n] accumulated attention mass
        self.valid: torch.Tensor | None = None  # [B, Hkv, n] False for padding
        self.positions: torch.Tensor | None = None  # [B, Hkv, n] absolute position of each kept token
        self.pending = False  # keys handed out but their attention not observed yet

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        attn_kwargs = kwargs.get("kwargs")
        if self.pending or not isinstance(attn_kwargs, dict):
            raise RuntimeError(
                "H2OCache: the attention probabilities of the previous step were never observed. Load the model "
                f"with attn_implementation={H2O_ATTENTION!r} (or call model.set_attn_implementation("
                f"{H2O_ATTENTION!r})) after importing seqpar.inference.h2o; the model's attention must call "
                "cache.update(k, v, layer_idx, kwargs=kwargs) as Llama, Mistral and Qwen2 do."
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        B, Hkv, Lnew, _ = key_states.shape
        start, self.cumulative_length = self.cumulative_length, self.cumulative_length + Lnew
        new_pos = torch.arange(start, start + Lnew, device=key_states.device).expand(B, Hkv, Lnew)
        acc = torch.promote_types(key_states.dtype, torch.float32)
        fresh = {
            "keys": key_states,
            "values": value_states,
            "scores": torch.zeros(B, Hkv, Lnew, dtype=acc, device=key_states.device),
            "valid": torch.ones(B, Hkv, Lnew, dtype=torch.bool, device=key_states.device),
            "positions": new_pos,
        }
        for name, t in fresh.items():
            old = getattr(self, name)
            setattr(self, name, t if old is None or old.numel() == 0 else torch.cat([old, t], dim=2))
        attn_kwargs[_LAYER_KEY] = self
        self.pending = True
        return self.keys, self.values

    def observe(self, probs: torch.Tensor, new_valid: torch.Tensor) -> None:
        """Add this step's probabilities ``probs [B, Hkv, G, Lq, n]`` to the scores, then evict.

        ``new_valid [B, Lq]`` says which of the new tokens are real (not padding)."""
        self.scores += probs.sum(dim=(2, 3)).to(self.scores.dtype)
        self.valid[..., -new_valid.shape[-1] :] = new_valid[:, None, :]
        self.pending = False
        self._evict()

    def kept_for_attention(self, n_new: int) -> torch.Tensor:
        """Validity ``[B, Hkv, n_cached]`` of the cached (pre-step) tokens, which every new query may see."""
        return self.valid[..., : self.valid.shape[-1] - n_new]

    def _evict(self) -> None:
        n = self.keys.shape[-2]
        if n <= self.heavy + self.recent:
            return
        old = n - self.recent
        # Padding never wins a heavy slot: its score is -inf.
        candidates = self.scores[..., :old].masked_fill(~self.valid[..., :old], float("-inf"))
        heavy = candidates.topk(self.heavy, dim=-1).indices.sort(dim=-1).values
        recent = torch.arange(old, n, device=heavy.device).expand(*heavy.shape[:2], self.recent)
        keep = torch.cat([heavy, recent], dim=-1)  # [B, Hkv, heavy + recent], in sequence order
        self._select(lambda t: t.gather(2, keep if t.ndim == 3 else keep[..., None].expand(-1, -1, -1, t.shape[-1])))

    def _select(self, fn) -> None:
        for name in ("keys", "values", "scores", "valid", "positions"):
            t = getattr(self, name)
            if t is not None and t.numel() > 0:
                setattr(self, name, fn(t))

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # The kept tokens are presented to the mask as the `kept` tokens right before the new ones; they are all
        # in the past of every new query, and their padding is re-applied from `valid` by the attention function.
        kept = self.keys.shape[-2] if self.is_initialized else 0
        return kept + query_length, self.cumulative_length - kept

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return self.heavy + self.recent

    def reset(self) -> None:
        super().reset()
        self.scores = self.valid = self.positions = None
        self.pending = False

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("H2OCache cannot be cropped: evicted tokens are gone (no assisted decoding).")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select(lambda t: t[indices, ...])


class H2OCache(Cache):
    """Heavy-Hitter Oracle KV cache: per layer and kv head, ``heavy`` top-score tokens + ``recent`` last tokens.

    Args:
        heavy: number of heavy-hitter tokens kept (>= 0).
        recent: number of most recent tokens kept (>= 0); ``heavy + recent >= 1``.

    Raises:
        ValueError: a budget that is not a non-negative int, or an empty total budget.
        RuntimeError (at the second step): the model does not run ``attn_implementation="seqpar_h2o"``.
    """

    def __init__(self, *, heavy: int, recent: int):
        for name, value in (("heavy", heavy), ("recent", recent)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"H2OCache: {name}={value!r} must be an int >= 0 (a number of tokens).")
        if heavy + recent < 1:
            raise ValueError(f"H2OCache: heavy + recent = {heavy + recent}; keep at least one token (e.g. recent=1).")
        self.heavy, self.recent = heavy, recent
        super().__init__(layer_class_to_replicate=self._new_layer)

    def _new_layer(self) -> H2OLayer:
        return H2OLayer(self.heavy, self.recent)

    def __repr__(self) -> str:
        return f"H2OCache(heavy={self.heavy}, recent={self.recent}, layers={len(self.layers)})"


def use_h2o_attention(model: Any) -> None:
    """Switch ``model`` to the ``seqpar_h2o`` attention (plain eager attention when no H2O cache is passed)."""
    if getattr(model.config, "_attn_implementation", None) == H2O_ATTENTION:
        return
    try:
        model.set_attn_implementation(H2O_ATTENTION)
    except (ValueError, AttributeError, NotImplementedError) as err:
        kind = getattr(model.config, "model_type", "?")
        raise ValueError(f"model_type={kind!r} cannot run the H2O cache ({' '.join(str(err).split())[:160]}); "
                         "use --cache full") from None


def new_cache(model: Any, budget: tuple[int, int] | None) -> Cache | None:
    """The cache to pass for one generation: None for the full cache (``budget`` None: transformers then builds
    the model's own, whatever its layers: sliding, linear, hybrid) or a fresh H2OCache, in which case the model
    is switched to the H2O attention first."""
    if budget is None:
        return None
    use_h2o_attention(model)
    return H2OCache(heavy=budget[0], recent=budget[1])


def kv_footprint(cache: Cache | None) -> dict:
    """What ``cache`` holds now: ``{"tokens": kept per layer (the most of any layer), "layers", "bytes": keys +
    values, "extra_bytes": H2O's per-token scores, validity and positions}`` (zeros for None)."""
    layers = getattr(cache, "layers", None) or []  # caches without K/V layers (linear-attention states): 0
    layers = [lay for lay in layers if getattr(lay, "keys", None) is not None and lay.keys.numel() > 0]
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts if t is not None)  # noqa: E731
    return {
        "tokens": max((lay.keys.shape[-2] for lay in layers), default=0),
        "layers": len(layers),
        "bytes": nbytes(t for lay in layers for t in (lay.keys, lay.values)),
        "extra_bytes": nbytes(getattr(lay, name, None) for lay in layers for name in ("scores", "valid", "positions")),
    }


def _attention_mask(attention_mask, B: int, Lq: int, n: int, device) -> torch.Tensor:
    """The model's mask as booleans ``[B, 1, Lq, n]`` (True = attend); causal when the model gave none."""
    if attention_mask is None:
        i = torch.arange(Lq, device=device)[:, None] + (n - Lq)
        return (torch.arange(n, device=device)[None, :] <= i).expand(B, 1, Lq, n)
    mask = attention_mask[..., -n:]
    if mask.dtype != torch.bool:  # additive float mask (eager style): 0 keeps, a large negative drops
        mask = mask > torch.finfo(mask.dtype).min / 2
    return mask.expand(B, 1, Lq, n)


def h2o_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Explicit-softmax attention that reports its probabilities to the H2O layer it was handed.

    query ``[B, H, Lq, D]``, key/value ``[B, Hkv, n, D]`` -> (out ``[B, Lq, H, D]``, probs ``[B, H, Lq, n]``).
    Without an H2O layer in ``kwargs`` it is plain (eager) attention.
    """
    B, H, Lq, D = query.shape
    Hkv, n = key.shape[1], key.shape[2]
    G = H // Hkv  # q head h reads kv head h // G (transformers' repeat_kv convention)
    acc = torch.promote_types(query.dtype, torch.float32)
    scale = D**-0.5 if scaling is None else scaling
    q = query.to(acc).view(B, Hkv, G, Lq, D)
    scores = torch.einsum("bkgqd,bknd->bkgqn", q, key.to(acc)) * scale
    mask = _attention_mask(attention_mask, B, Lq, n, query.device)[:, :, None]  # [B, 1, 1, Lq, n]
    layer: H2OLayer | None = kwargs.get(_LAYER_KEY)
    if layer is not None:
        # Cached tokens are all in the past; only their own padding flag (not their mask slot) decides.
        cached = layer.kept_for_attention(Lq)[:, :, None, None, :].expand(B, Hkv, 1, Lq, -1)
        mask = torch.cat([cached, mask[..., n - Lq :].expand(B, Hkv, 1, Lq, Lq)], dim=-1)
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1).nan_to_num(0.0)  # empty rows -> 0
    if layer is not None:
        layer.observe(probs, new_valid=mask[:, 0, 0, -1, n - Lq :])
    dropped = torch.nn.functional.dropout(probs, p=dropout, training=module.training)
    out = torch.einsum("bkgqn,bknd->bqkgd", dropped, value.to(acc)).reshape(B, Lq, H, D)
    return out.to(query.dtype), probs.reshape(B, H, Lq, n).to(query.dtype)


def _h2o_mask(**kwargs: Any):
    # Always materialise a boolean mask: the attention function needs it to find padding.
    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(**kwargs)


AttentionInterface.register(H2O_ATTENTION, h2o_attention)
AttentionMaskInterface.register(H2O_ATTENTION, _h2o_mask)
