"""Passkey retrieval accuracy across context lengths (Mohtashami & Jaggi 2023, as evaluated by LongLoRA).

A 5-digit key is hidden at a chosen depth inside repeated filler ("The grass is green. The sky is blue. ..."),
after LongLoRA's instruction ("There is an important info hidden inside a lot of irrelevant text. ...") and
before the question "What is the pass key? The pass key is". The model decodes greedily as many tokens as the
answer has; a trial is correct when the digits it writes equal the key exactly. The prompt is built by the
trainer's ``seqpar.train.data.passkey_sample`` (so a model fine-tuned on the synthetic passkey task is
evaluated on exactly the format it saw): a ``length``-token sample minus its answer and EOS is the prompt,
so prompt + answer fit in ``length`` positions. Single device: no communication (0 bytes per call). With
``budget`` the decoding runs through SinkLoRA's H2O cache (``seqpar eval --cache h2o``).
"""

from __future__ import annotations

import random
import re
from typing import Any

import torch

from seqpar.eval import EvalError
from seqpar.eval.perplexity import check_context


def passkey_prompt(tokenizer: Any, length: int, depth: float, rng: random.Random) -> dict:
    """One trial: ``{"prompt": ids [P], "answer": ids [A], "key": "NNNNN", "depth": depth}`` with P + A < length."""
    from seqpar.train.data import PASSKEY_QUESTION, passkey_sample
    from seqpar.train.recipe import RecipeError

    try:
        sample = passkey_sample(tokenizer, length, rng, depth)
    except RecipeError:
        raise EvalError(f"--lengths {length} is too short for a passkey prompt with this tokenizer; "
                        "use longer --lengths") from None
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    key = sample["passkey"]
    question, tail = enc(PASSKEY_QUESTION), enc(PASSKEY_QUESTION + key)
    if tail[: len(question)] != question:  # the answer must start on a token boundary to be generated alone
        raise EvalError("this tokenizer merges the passkey digits with the question; the passkey eval needs a "
                        "tokenizer that keeps them apart (Llama, Mistral, Qwen2 and byte-level ones do)")
    answer = tail[len(question) :]
    ids = sample["input_ids"]
    prompt = ids[: ids.numel() - 1 - len(answer)]  # drop the answer and the trailing EOS
    return {"prompt": prompt, "answer": answer, "key": key, "depth": depth}


@torch.no_grad()
def greedy_generate(model: Any, prompt: torch.Tensor, n_new: int, cache: Any = None) -> tuple[list[int], Any]:
    """``n_new`` greedily decoded token ids after ``prompt [P]`` and the cache they left, through ``cache`` when
    given (a fresh transformers Cache, e.g. an H2OCache); module-level so tests can swap in an oracle."""
    from seqpar.inference.h2o import CACHE_KWARG

    device = next(model.parameters()).device
    ids = prompt.to(device)[None]
    kw = {} if cache is None else {CACHE_KWARG: cache}
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new, min_new_tokens=n_new,
                         do_sample=False, num_beams=1, pad_token_id=0, return_dict_in_generate=True, **kw)
    return out.sequences[0, ids.shape[1] :].tolist(), out.get(CACHE_KWARG)


def is_correct(text: str, key: str) -> bool:
    """Exact match: the first run of digits the model wrote is the key (LongLoRA strips and compares)."""
    found = re.search(r"\d+", text)
    return found is not None and found.group(0) == key


def passkey_accuracy(model: Any, tokenizer: Any, *, length: int, trials: int = 10, seed: int = 0,
                     budget: tuple[int, int] | None = None) -> dict:
    """Accuracy of greedy passkey retrieval at one context length, depths spread evenly over (0, 1).

    ``budget`` (heavy, recent): generate through an H2OCache (the prompt is prefilled with full attention, then
    evicted to the budget before the answer is decoded, as H2O generation does); None: the full cache.

    Returns ``{"length", "trials", "correct", "accuracy", "kv_tokens", "kv_bytes", "results": [{"depth", "key",
    "output", "ok"}]}`` (kv_*: what the last trial's KV cache held at its end, keys + values).
    """
    from seqpar.inference.h2o import kv_footprint, new_cache

    if trials < 1:
        raise EvalError(f"--trials {trials}: use --trials >= 1")
    check_context(model, length, arg="--lengths")
    rng = random.Random(seed * 1000003 + length)
    results, cache = [], None
    for i in range(trials):
        trial = passkey_prompt(tokenizer, length, (i + 0.5) / trials, rng)
        new, cache = greedy_generate(model, trial["prompt"], len(trial["answer"]), new_cache(model, budget))
        text = tokenizer.decode(new, skip_special_tokens=True)
        results.append({"depth": trial["depth"], "key": trial["key"], "output": text.strip(),
                        "ok": is_correct(text, trial["key"])})
    correct = sum(r["ok"] for r in results)
    footprint = kv_footprint(cache)
    return {"length": length, "trials": trials, "correct": correct, "accuracy": correct / trials,
            "kv_tokens": footprint["tokens"], "kv_bytes": footprint["bytes"], "results": results}
