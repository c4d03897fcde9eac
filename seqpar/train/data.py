"""Training data: local files through ``datasets`` packed to ``seq_len`` with document boundaries kept,
LongLoRA's synthetic passkey-retrieval task, or SFT conversations (seqpar/train/sft.py); a deterministic batch
order that a resumed run can replay.

A sample is ``input_ids [L]`` plus ``doc_lens`` (lengths of the packed documents, summing to L). The
batch for (step, micro-step, DP rank) is a pure function of those numbers and the seed, so the data
position in a checkpoint is just the step, and every rank of an SP group reads the same global batch
(the model code then keeps only its shard).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

from seqpar.train.recipe import DataSection, Recipe, RecipeError

# LongLoRA's passkey prompt (Mohtashami & Jaggi 2023, as used in LongLoRA's passkey_retrivial.py).
PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
                 "I will quiz you about the important information there. ")
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY_QUESTION = " What is the pass key? The pass key is "


def byte_tokenizer() -> Any:
    """A byte-level tokenizer made on the spot (256 bytes + <pad>, <s>, </s>): no hub, savable. Its chat template
    (``user: ...\nassistant: ...</s>``, with generation markers) lets CPU recipes train and chat without a hub."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from seqpar.train.sft import BYTE_CHAT_TEMPLATE

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    vocab.update({ch: i + 3 for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   chat_template=BYTE_CHAT_TEMPLATE)


def load_tokenizer(recipe: Recipe) -> Any:
    from transformers import AutoTokenizer

    folder = recipe.data.tokenizer or recipe.model.path
    if recipe.model.from_config is not None and recipe.data.tokenizer is None:
        return byte_tokenizer()
    if folder is None or not Path(folder).is_dir():
        raise RecipeError(f"data.tokenizer={folder!r} is not a local folder: point data.tokenizer (or model.path) "
                          "at a folder with tokenizer files")
    return AutoTokenizer.from_pretrained(folder, trust_remote_code=recipe.model.trust_remote_code)


def passkey_sample(tokenizer: Any, seq_len: int, rng: random.Random, depth: float) -> dict:
    """One passkey prompt of exactly ``seq_len`` tokens: filler with the key hidden at ``depth`` in [0, 1]."""
    key = str(rng.randint(10000, 99999))
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    info, tail = enc(f"The pass key is {key}. Remember it. {key} is the pass key. "), enc(PASSKEY_QUESTION + key)
    head = [tokenizer.bos_token_id or 0, *enc(PASSKEY_INTRO)]
    if len(head) + len(info) + len(tail) + 1 > seq_len:
        head = head[:1]  # short sequences keep the task and drop the preamble
    n_filler = seq_len - len(head) - len(info) - len(tail) - 1
    if n_filler < 0:
        raise RecipeError(f"data.seq_len={seq_len} is too short for a passkey prompt: use >= "
                          f"{seq_len - n_filler}")
    filler_unit = enc(PASSKEY_FILLER)
    filler = (filler_unit * (n_filler // len(filler_unit) + 1))[:n_filler]
    at = round(depth * n_filler)
    ids = head + filler[:at] + info + filler[at:] + tail + [tokenizer.eos_token_id or 0]
    return {"input_ids": torch.tensor(ids, dtype=torch.long), "doc_lens": [seq_len], "passkey": key}


def passkey_dataset(tokenizer: Any, data: DataSection, seed: int) -> list[dict]:
    rng = random.Random(seed)
    p = data.passkey
    return [passkey_sample(tokenizer, data.seq_len, rng, rng.uniform(p.min_depth, p.max_depth))
            for _ in range(p.num_samples)]


def file_dataset(tokenizer: Any, data: DataSection, files: list[str] | None = None,
                 key: str = "data.files") -> list[dict]:
    """Local files -> samples of ``seq_len`` tokens: packed (documents end with </s>) or one per document."""
    from datasets import load_dataset

    files = list(data.files if files is None else files)
    fmt = data.format or Path(files[0]).suffix.lstrip(".")
    builder = {"jsonl": "json", "json": "json", "txt": "text", "text": "text", "parquet": "parquet"}.get(fmt)
    if builder is None:
        raise RecipeError(f"data.format={fmt!r}: use jsonl, json, text or parquet")
    ds = load_dataset(builder, data_files=files, split="train")
    if data.text_field not in ds.column_names:
        raise RecipeError(f"data.text_field={data.text_field!r} is not a column of {key}={files}: "
                          f"columns are {ds.column_names}")
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    docs = [[*ids, eos] for ids in tokenizer(list(ds[data.text_field]), add_special_tokens=False)["input_ids"]]
    L, samples = data.seq_len, []
    if not data.pack:  # one document per sample: shorter ones are skipped, longer ones are never cut silently
        for i, d in enumerate(docs):
            if len(d) > L:
                raise RecipeError(f"data.pack=false but document {i} of {key}={files} has {len(d)} tokens "
                                  f"(with </s>), more than data.seq_len={L}: set data.pack=true to split documents "
                                  "across samples, raise data.seq_len, or shorten the document")
        samples = [{"input_ids": torch.tensor(d), "doc_lens": [L]} for d in docs if len(d) == L]
        if not samples:
            longest = max(len(d) for d in docs)
            raise RecipeError(f"data.pack=false keeps only documents of exactly data.seq_len={L} tokens (with </s>) "
                              f"and none of {key}={files} has that many (the longest has {longest}): set "
                              f"data.pack=true, or data.seq_len to a length your documents have")
        return samples
    buf: list[int] = []
    lens: list[int] = []
    for d in docs:
        while d:
            take = d[: L - len(buf)]
            buf, d = buf + take, d[len(take):]
            lens.append(len(take))
            if len(buf) == L:
                samples.append({"input_ids": torch.tensor(buf), "doc_lens": lens})
                buf, lens = [], []
    if not samples:
        raise RecipeError(f"{key}={files} hold fewer than data.seq_len={L} tokens")
    return samples


def build_dataset(recipe: Recipe, tokenizer: Any) -> list[dict]:
    if recipe.data.source == "passkey":
        return passkey_dataset(tokenizer, recipe.data, recipe.trainer.seed)
    if recipe.data.source == "sft":
        from seqpar.train.sft import sft_dataset

        return sft_dataset(tokenizer, recipe.data, recipe.trainer.seed)
    return file_dataset(tokenizer, recipe.data)


def split_eval(samples: list[dict], recipe: Recipe, tokenizer: Any, dp_size: int) -> tuple[list[dict], list[dict]]:
    """``(train, held_out)``: ``data.eval_files`` as the held-out set, else ``data.eval_fraction`` of the samples
    (a seeded choice) taken out of training. Empty held-out set when neither is set."""
    d, e, t = recipe.data, recipe.eval, recipe.trainer
    if d.eval_files and d.source == "sft":
        from seqpar.train.sft import sft_dataset

        held = sft_dataset(tokenizer, d, t.seed, d.eval_files, key="data.eval_files")
    elif d.eval_files:
        held = file_dataset(tokenizer, d, d.eval_files, key="data.eval_files")
    elif d.eval_fraction > 0:
        k = max(1, round(d.eval_fraction * len(samples)))
        if k >= len(samples):
            raise RecipeError(f"data.eval_fraction={d.eval_fraction} holds out all {len(samples)} samples: lower it")
        out = set(torch.randperm(len(samples), generator=torch.Generator().manual_seed(t.seed + 1))[:k].tolist())
        held = [s for i, s in enumerate(samples) if i in out]
        samples = [s for i, s in enumerate(samples) if i not in out]
    else:
        return samples, []
    need = e.batches * dp_size * t.micro_batch if e.every else 0
    if len(held) < need:
        raise RecipeError(f"the held-out set has {len(held)} samples; eval needs eval.batches x dp_size x "
                          f"trainer.micro_batch = {e.batches} x {dp_size} x {t.micro_batch} = {need} distinct ones "
                          "(no DP rank sees another's): raise data.eval_fraction, add data.eval_files or lower "
                          "eval.batches")
    return samples, held


def eval_batch(held: list[dict], recipe: Recipe, i: int, dp_rank: int, dp_size: int) -> dict:
    """Eval batch ``i`` of DP rank ``dp_rank``: held-out samples no other DP rank (and no training step) reads."""
    mb = recipe.trainer.micro_batch
    first = (i * dp_size + dp_rank) * mb
    return _stack([held[j % len(held)] for j in range(first, first + mb)])


def batch_at(samples: list[dict], recipe: Recipe, step: int, micro: int, dp_rank: int, dp_size: int,
             *, offset: int = 0) -> dict:
    """The global batch DP rank ``dp_rank`` trains on at (step, micro): ``input_ids [B, L]`` and ``doc_lens`` (and
    ``labels [B, L]`` for SFT samples).

    Sample i of the stream is ``perm_epoch[i % N]`` with a seeded permutation per epoch: no state to save.
    """
    t, n = recipe.trainer, len(samples)
    first = (((step * t.grad_accum + micro) * dp_size + dp_rank) * t.micro_batch) + offset
    picked = []
    for i in range(first, first + t.micro_batch):
        epoch, j = divmod(i, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(t.seed * 1000003 + epoch))
        picked.append(samples[int(perm[j])])
    return _stack(picked)


def _stack(picked: list[dict]) -> dict:
    """``input_ids [B, L]``, ``doc_lens`` per row, and ``labels [B, L]`` when the samples carry them (SFT)."""
    out = {"input_ids": torch.stack([s["input_ids"] for s in picked]), "doc_lens": [s["doc_lens"] for s in picked]}
    if "labels" in picked[0]:
        out["labels"] = torch.stack([s["labels"] for s in picked])
    return out
