"""Sliding-window perplexity of a causal LM on a local text file (the standard Hugging Face method).

The file is one token stream ``x_0 .. x_{T-1}`` (BOS first when the tokenizer has one). Windows of ``context``
tokens start every ``stride`` tokens; each window scores only the tokens that no earlier window scored, each
one conditioned on the tokens before it inside the window (at least ``context - stride``):

    NLL = - sum_{t in S} log p(x_t | x_{begin(t)} .. x_{t-1}),   PPL = exp(NLL / |S|)

A window's first token has nothing before it inside the window, so it is not scored there: with disjoint
windows (``stride == context``) S misses one token per window, exactly as in the guide's loop.

This is "Perplexity of fixed-length models" from the transformers documentation, and what LongLoRA reports
on PG19 / proof-pile at each context length. Single device, one window at a time ([1, context] tokens): no
communication (0 bytes per call).

With an H2O cache (``seqpar eval --cache h2o``) each window is decoded one token per forward through a fresh
``H2OCache``: every scored token is predicted from the heavy hitters + recent tokens the cache kept, exactly what
generation would see at that point (slower: ``context`` forwards per window instead of one).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from seqpar.eval import EvalError


def read_text(path: str | Path, *, arg: str = "--ppl") -> str:
    """The UTF-8 text of ``path``; raises EvalError naming ``arg`` if it is missing, empty or not UTF-8."""
    p = Path(path)
    if not p.is_file():
        raise EvalError(f"{arg} {str(path)!r}: no such file; pass the path of a UTF-8 text file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise EvalError(f"{arg} {str(path)!r} is not UTF-8 text ({err.reason} at byte {err.start}); convert it, "
                        "e.g. iconv -f LATIN1 -t UTF-8") from None
    if not text.strip():
        raise EvalError(f"{arg} {str(path)!r} is empty; pass a file that holds text")
    return text


def tokenize_stream(tokenizer: Any, text: str) -> torch.Tensor:
    """The whole text as one stream of token ids ``[T]``, with the tokenizer's BOS in front when it has one."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id, *ids]
    return torch.tensor(ids, dtype=torch.long)


def windows(total: int, *, context: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, first_scored)`` per window: tokens ``first_scored .. end-1`` are scored in that window."""
    out, prev_end = [], 0
    for begin in range(0, total, stride):
        end = min(begin + context, total)
        first = max(prev_end, begin + 1)  # a window's first token has no context inside it: never scored there
        if end > first:
            out.append((begin, end, first))
        prev_end = end
        if end == total:
            break
    return out


@torch.no_grad()
def sliding_window_nll(model: Any, ids: torch.Tensor, *, context: int, stride: int,
                       budget: tuple[int, int] | None = None) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) over the scored tokens of ``ids [T]``, and how many were scored.

    ``budget`` (heavy, recent): decode each window token by token through an H2OCache instead of one forward."""
    nll, count, _ = _scored_windows(model, ids, context=context, stride=stride, budget=budget)
    return nll, count


def _scored_windows(model: Any, ids: torch.Tensor, *, context: int, stride: int,
                    budget: tuple[int, int] | None) -> tuple[float, int, dict]:
    """(summed NLL, scored tokens, the largest KV footprint a window left: seqpar.inference.h2o.kv_footprint)."""
    device = next(model.parameters()).device
    nll, count, peak = 0.0, 0, None
    for begin, end, first in windows(ids.numel(), context=context, stride=stride):
        window = ids[begin:end].to(device)[None]
        logits, footprint = _window_logits(model, window, budget)  # [end - begin, vocab]
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 logits: score in fp32
        # Logit row i predicts token begin + i + 1; keep the rows whose target is new in this window.
        rows = slice(first - begin - 1, end - begin - 1)
        logp = torch.log_softmax(logits[rows], dim=-1)
        targets = window[0, first - begin : end - begin]
        nll -= logp.gather(-1, targets[:, None]).sum().item()
        count += end - first
        peak = footprint if peak is None or footprint["bytes"] > peak["bytes"] else peak
    return nll, count, peak


def _window_logits(model: Any, window: torch.Tensor, budget: tuple[int, int] | None) -> tuple[torch.Tensor, dict]:
    """Logits ``[L, vocab]`` of ``window [1, L]`` and the KV footprint at its end.

    Full cache: one forward. H2O: one token per forward through a fresh H2OCache, so every prediction sees only
    what the cache kept (as in generation; a multi-token forward would let its tokens attend to each other fully
    before eviction)."""
    from seqpar.inference.h2o import CACHE_KWARG, kv_footprint, new_cache

    if budget is None:
        out = model(input_ids=window, use_cache=True)
        return out.logits[0], kv_footprint(out.get(CACHE_KWARG))
    cache = new_cache(model, budget)
    step = lambda i: model(input_ids=window[:, i : i + 1], **{CACHE_KWARG: cache}).logits[0, -1]  # noqa: E731
    rows = [step(i) for i in range(window.shape[1])]
    return torch.stack(rows), kv_footprint(cache)


def perplexity(model: Any, tokenizer: Any, text: str, *, context: int, stride: int | None = None,
               budget: tuple[int, int] | None = None) -> dict:
    """Sliding-window perplexity of ``text`` at one context length.

    Args:
        context: tokens per window (>= 2, <= the model's max_position_embeddings).
        stride: tokens between window starts, 1 .. context (default ``context``: disjoint windows).
        budget: ``(heavy, recent)`` to score through an H2OCache, token by token; None: the full cache.

    Returns:
        ``{"context", "stride", "tokens", "windows", "nll", "ppl", "kv_tokens", "kv_bytes"}`` (nll: mean nats per
        scored token; kv_*: what the KV cache held at the end of the longest window, keys + values).
    """
    stride = context if stride is None else stride
    if context < 2:
        raise EvalError(f"--context {context}: a window needs at least 2 tokens; use --context >= 2")
    if not 1 <= stride <= context:
        raise EvalError(f"--stride {stride} with --context {context}: use 1 <= --stride <= --context")
    check_context(model, context, arg="--context")
    ids = tokenize_stream(tokenizer, text)
    if ids.numel() < 2:
        raise EvalError(f"--ppl text has {ids.numel()} token(s); perplexity needs at least 2")
    nll, count, footprint = _scored_windows(model, ids, context=context, stride=stride, budget=budget)
    n_windows = len(windows(ids.numel(), context=context, stride=stride))
    return {"context": context, "stride": stride, "tokens": count, "windows": n_windows,
            "nll": nll / count, "ppl": math.exp(nll / count), "kv_tokens": footprint["tokens"],
            "kv_bytes": footprint["bytes"]}


def check_context(model: Any, length: int, *, arg: str) -> None:
    """Raise EvalError if ``length`` tokens exceed the model's position range."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and length > limit:
        raise EvalError(f"{arg} {length} exceeds the model's max_position_embeddings={limit}; use {arg} <= {limit}, "
                        "or evaluate a model whose positions were extended (e.g. a LongLoRA checkpoint)")
