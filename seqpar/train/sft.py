"""Supervised fine-tuning data (``data.source: sft``): conversations -> samples whose labels are the responses.

A sample is ``{"input_ids": [L], "labels": [L], "doc_lens": [...]}`` like every other source, plus ``labels``:
the token id on every assistant-response token (its end-of-turn / eos token included, so the model learns to
stop) and -100 everywhere else (system and user text, the template's own text, padding). Labels are unshifted
(Hugging Face convention); ``shard_batch`` shifts them over the whole sequence and masks document boundaries.

Two row shapes, read by ``datasets`` from jsonl / json / parquet: Alpaca (``instruction``, ``input``,
``output``, as LongAlpaca-12k and LongAlpaca-plus ship) and chat ``messages`` (``role`` / ``content``; every
assistant turn is a target). Rendering uses the tokenizer's chat template when it has one (the assistant
spans from its ``{% generation %}`` markers, else by rendering the conversation prefix by prefix), or a named
template (``longlora-llama2``: LongLoRA's supervised-fine-tune.py prompt; ``alpaca``: Stanford Alpaca's).

Conversations are packed several per sequence with their boundaries kept (``doc_lens``: the trainer passes them
as ``cu_seqlens`` to ring / allgather / full attention, so no conversation attends to another), the tail padded
by a pad "document"; with ``data.pack: false`` one conversation per sequence, right-padded (LongLoRA's SFT, and
the only choice for s2 / sf, which take no documents). A conversation longer than ``data.seq_len`` is cut from
the prompt side (``truncate_prompt``: the oldest prompt tokens go, the responses stay whole) or dropped, never
cut in a response; rank 0 prints the counts.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from seqpar.train.recipe import DataSection, RecipeError, SftSection

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")

# LongLoRA's supervised-fine-tune.py (PROMPT_DICT "prompt_input_llama2" / "prompt_llama2"): the Llama-2 system
# prompt when the row has an input, the bare [INST] wrapper when it has none; the target is output + </s>.
LLAMA2_SYSTEM = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being safe.  "
    "Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal content. "
    "Please ensure that your responses are socially unbiased and positive in nature.\n\n"
    "If a question does not make any sense, or is not factually coherent, explain why instead of answering "
    "something not correct. If you don't know the answer to a question, please don't share false information.\n"
)
# Stanford Alpaca's PROMPT_DICT (LongLoRA's supervised-fine-tune.py carries it too).
ALPACA_HEAD = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
               "request.")
ALPACA_HEAD_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                     "context. Write a response that appropriately completes the request.")

# The byte tokenizer's chat template (seqpar.train.data.byte_tokenizer): short, and with generation markers so
# that the assistant tokens come from the template itself.
BYTE_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] }}: "
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}"
    "{% else %}{{ message['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
_GENERATION = re.compile(r"{%-?\s*generation\s*-?%}")


# ----------------------------------------------------------------------------------------------------------
# Rows -> conversations


def read_rows(files: list[str], data: DataSection, key: str) -> list[dict]:
    """The rows of ``files`` (jsonl / json / parquet through ``datasets``)."""
    from datasets import load_dataset

    fmt = data.format or Path(files[0]).suffix.lstrip(".")
    builder = {"jsonl": "json", "json": "json", "parquet": "parquet"}.get(fmt)
    if builder is None:
        raise RecipeError(f"data.format={fmt!r} with data.source=sft: conversations come in jsonl, json or parquet "
                          f"files ({key}={files})")
    return list(load_dataset(builder, data_files=files, split="train"))


def to_messages(rows: list[dict], sft: SftSection, key: str) -> list[list[dict]]:
    """Every row as a list of ``{role, content}``: Alpaca rows become one user turn and one assistant turn."""
    if not rows:
        raise RecipeError(f"{key} hold no rows: give files with conversations")
    cols = set(rows[0])
    shape = sft.shape
    if shape == "auto":
        shape = "messages" if sft.messages_field in cols else "alpaca"
    if shape == "messages":
        if sft.messages_field not in cols:
            raise RecipeError(f"data.sft.messages_field={sft.messages_field!r} is not a column of {key}: columns are "
                              f"{sorted(cols)}; set data.sft.messages_field, or data.sft.shape=alpaca")
        return [_check_messages(r[sft.messages_field], i, key) for i, r in enumerate(rows)]
    for name in ("instruction_field", "output_field"):
        column = getattr(sft, name)
        if column not in cols:
            raise RecipeError(f"data.sft.{name}={column!r} is not a column of {key}: columns are {sorted(cols)}; "
                              f"set data.sft.{name} (Alpaca rows: instruction, input, output) or "
                              f"data.sft.messages_field (chat rows)")
    out = []
    for r in rows:
        extra = r.get(sft.input_field) or ""
        out.append([{"role": "user", "content": str(r[sft.instruction_field]), "input": str(extra)},
                    {"role": "assistant", "content": str(r[sft.output_field] or "")}])
    return out


def _check_messages(messages: Any, i: int, key: str) -> list[dict]:
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise RecipeError(f"row {i} of {key}: messages must be a list of {{role, content}}, got "
                          f"{type(messages).__name__}")
    for m in messages:
        if m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise RecipeError(f"row {i} of {key}: message {_short(m)} needs role in {list(ROLES)} and a string "
                              "content")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _short(m: Any) -> str:
    text = repr(m)
    return text if len(text) <= 60 else text[:57] + "..."


# ----------------------------------------------------------------------------------------------------------
# Conversations -> (ids, labels)


def template_name(tokenizer: Any, sft: SftSection) -> str:
    """The template a run uses: ``tokenizer`` (its chat template) or a named one."""
    has = bool(getattr(tokenizer, "chat_template", None))
    if sft.template == "tokenizer" and not has:
        raise RecipeError("data.sft.template=tokenizer but the tokenizer has no chat template: set data.sft.template="
                          "longlora-llama2 (LongLoRA's prompt) or alpaca, or use a tokenizer with one")
    if sft.template == "auto":
        return "tokenizer" if has else "longlora-llama2"
    return sft.template


def render(tokenizer: Any, messages: list[dict], template: str) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of one conversation: labels are the ids on assistant tokens, -100 elsewhere."""
    return render_all(tokenizer, [messages], template)[0]


def render_all(tokenizer: Any, conversations: list[list[dict]], template: str,
               key: str = "the conversations") -> list[tuple[list[int], list[int]]]:
    """``render`` for many conversations; the texts are tokenized in one batched call (LongAlpaca's 12k papers)."""
    from jinja2 import TemplateError

    marked = template == "tokenizer" and bool(_GENERATION.search(str(tokenizer.chat_template)))
    out, texts, spans, at = [], [], [], []
    for i, messages in enumerate(conversations):
        try:
            if marked:  # the template marks the assistant tokens itself
                enc = tokenizer.apply_chat_template([_plain(m) for m in messages], tokenize=True, return_dict=True,
                                                    return_assistant_tokens_mask=True)
                ids = list(enc["input_ids"])
                out.append((ids, [t if m else IGNORE_INDEX for t, m in zip(ids, enc["assistant_masks"])]))
                continue
            text, found = (_prefix_spans(tokenizer, [_plain(m) for m in messages]) if template == "tokenizer"
                           else _named(tokenizer, messages, template))
        except TemplateError as err:  # e.g. Llama-2-chat's "roles must alternate user/assistant/user/assistant"
            raise RecipeError(f"row {i} of {key}: the tokenizer's chat template refused it ({err}): fix the row, or "
                              "set data.sft.template=longlora-llama2") from None
        out.append(None)
        at.append(i)
        texts.append(text)
        spans.append(found)
    for i, labelled in zip(at, _tokenize_spans(tokenizer, texts, spans)):
        out[i] = labelled
    return out


def _plain(m: dict) -> dict:
    """An Alpaca row's user turn for a chat template: the input below the instruction."""
    if m.get("input"):
        return {"role": m["role"], "content": f"{m['content']}\n\n{m['input']}"}
    return {"role": m["role"], "content": m["content"]}


def _prefix_spans(tokenizer: Any, msgs: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """Assistant character spans of a chat template without generation markers: the text that rendering
    ``messages[:k + 1]`` adds to ``messages[:k]`` with the generation prompt (the response and its end-of-turn)."""
    full = tokenizer.apply_chat_template(msgs, tokenize=False)
    spans = []
    for k, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(msgs[:k], tokenize=False, add_generation_prompt=True) if k else ""
        after = tokenizer.apply_chat_template(msgs[: k + 1], tokenize=False)
        if not (after.startswith(before) and full.startswith(after)):
            raise RecipeError("the tokenizer's chat template renders a conversation differently from its beginning "
                              "(it rewrites earlier turns), so the assistant tokens cannot be found: set "
                              "data.sft.template=longlora-llama2 or alpaca, or give the template {% generation %} "
                              "markers")
        spans.append((len(before), len(after)))
    return full, spans


def _named(tokenizer: Any, messages: list[dict], template: str) -> tuple[str, list[tuple[int, int]]]:
    """A named template's text and the character spans of the responses (each ends with the eos token)."""
    bos, eos = tokenizer.bos_token or "", tokenizer.eos_token or ""
    system = next((m["content"] for m in messages if m["role"] == "system"), None)
    parts: list[tuple[str, bool]] = []
    first = True
    for m in messages:
        if m["role"] == "system":
            continue
        if m["role"] == "assistant":
            parts.append((m["content"] + eos, True))
            continue
        text, extra = m["content"], m.get("input", "")
        if template == "longlora-llama2":
            if first and (extra or system):  # LongLoRA's prompt_input_llama2 (with its system prompt)
                sys_text = LLAMA2_SYSTEM if system is None else system + "\n"
                body = f"{text} \n{extra}" if extra else text
                prompt = f"[INST] <<SYS>>\n{sys_text}<</SYS>> \n\n {body} [/INST]"
            else:  # LongLoRA's prompt_llama2
                prompt = f"[INST]{text}\n{extra}[/INST]" if extra else f"[INST]{text}[/INST]"
            parts.append((bos + prompt, False))
        else:  # alpaca
            head = (ALPACA_HEAD_INPUT if extra else ALPACA_HEAD) + "\n\n" if first else "\n\n"
            if first and system:
                head = system + "\n\n"
            body = f"### Instruction:\n{text}\n\n### Input:\n{extra}" if extra else f"### Instruction:\n{text}"
            parts.append(((bos if first else "") + f"{head}{body}\n\n### Response:", False))
        first = False
    text, spans, at = "", [], 0
    for piece, target in parts:
        if target:
            spans.append((at, at + len(piece)))
        text += piece
        at += len(piece)
    return text, spans


def _tokenize_spans(tokenizer: Any, texts: list[str], spans: list[list[tuple[int, int]]]) -> list[tuple]:
    """Tokenize each whole text once (as LongLoRA does) and label the tokens that overlap a response span."""
    if not texts:
        return []
    if not getattr(tokenizer, "is_fast", False):
        raise RecipeError("data.source=sft needs a fast tokenizer (a tokenizer.json in data.tokenizer's folder) to "
                          "map responses to tokens: convert it with transformers' AutoTokenizer(use_fast=True)")
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for ids, offsets, found in zip(enc["input_ids"], enc["offset_mapping"], spans):
        labels = [t if any(a < e and b > s for s, e in found) else IGNORE_INDEX for t, (a, b) in zip(ids, offsets)]
        out.append((list(ids), labels))
    return out


# ----------------------------------------------------------------------------------------------------------
# Length policy and packing


@dataclass
class Counts:
    kept: int = 0
    truncated: int = 0  # kept, with prompt tokens cut
    dropped: int = 0  # longer than seq_len (drop, or even without their first prompt)
    empty: int = 0  # no assistant response: nothing to learn

    def line(self, seq_len: int, policy: str) -> str:
        return (f"seqpar: sft: kept {self.kept} conversations, truncated {self.truncated} from the prompt side, "
                f"dropped {self.dropped} longer than data.seq_len={seq_len} ({policy}) and {self.empty} without an "
                "assistant response")


def fit(ids: list[int], labels: list[int], seq_len: int, policy: str, counts: Counts) -> tuple | None:
    """The conversation within ``seq_len`` tokens, or None (counted). ``truncate_prompt`` cuts the oldest tokens
    before the first response (keeping the first token, usually <s>): responses are never cut."""
    first = next((i for i, t in enumerate(labels) if t != IGNORE_INDEX), None)
    if first is None:
        counts.empty += 1
        return None
    excess = len(ids) - seq_len
    if excess <= 0:
        counts.kept += 1
        return ids, labels
    if policy == "drop" or first - 1 < excess:
        counts.dropped += 1
        return None
    counts.kept += 1
    counts.truncated += 1
    return ids[:1] + ids[1 + excess:], labels[:1] + labels[1 + excess:]


def pack(convs: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int, packed: bool) -> list[dict]:
    """Samples of ``seq_len`` tokens: conversations packed in order (a new sample when the next one does not fit)
    with a pad document at the tail, or one conversation per sample right-padded (``doc_lens == [seq_len]``)."""
    groups: list[list[tuple[list[int], list[int]]]] = []
    used = seq_len
    for conv in convs:
        if not packed or used + len(conv[0]) > seq_len:
            groups.append([])
            used = 0
        groups[-1].append(conv)
        used += len(conv[0])
    samples = []
    for group in groups:
        ids = [t for c in group for t in c[0]]
        labels = [t for c in group for t in c[1]]
        pad = seq_len - len(ids)
        docs = [len(c[0]) for c in group] + ([pad] if pad else []) if packed else [seq_len]
        samples.append({"input_ids": torch.tensor(ids + [pad_id] * pad, dtype=torch.long),
                        "labels": torch.tensor(labels + [IGNORE_INDEX] * pad, dtype=torch.long), "doc_lens": docs})
    return samples


def sft_dataset(tokenizer: Any, data: DataSection, seed: int, files: list[str] | None = None,
                key: str = "data.files", *, log: bool = True) -> list[dict]:
    """The samples of ``data.source: sft`` (``files``: the held-out ``data.eval_files`` instead of data.files)."""
    sft = data.sft
    if sft.make is not None and files is None:
        where = f"data.sft.make={sft.make}"
        conversations = stdlib_qa(sft.num_conversations, seed)
    else:
        files = list(data.files if files is None else files)
        where = f"{key}={files}"
        conversations = to_messages(read_rows(files, data, key), sft, where)
    template = template_name(tokenizer, sft)
    counts, kept = Counts(), []
    for ids, labels in render_all(tokenizer, conversations, template, where):
        out = fit(ids, labels, data.seq_len, sft.overlong, counts)
        if out is not None:
            kept.append(out)
    if log and _is_main():
        print(counts.line(data.seq_len, sft.overlong), flush=True)
    if not kept:
        raise RecipeError(f"data.source=sft: no conversation of {where} fits data.seq_len={data.seq_len} with a "
                          f"response ({counts.line(data.seq_len, sft.overlong)[13:]}): raise data.seq_len")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    return pack(kept, data.seq_len, pad, data.pack)


def _is_main() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


# ----------------------------------------------------------------------------------------------------------
# The quick chat set: questions about Python standard-library source files, answered from the file

STDLIB_MODULES = ("base64", "bisect", "calendar", "colorsys", "copy", "csv", "difflib", "filecmp", "fnmatch",
                  "gettext", "glob", "gzip", "heapq", "html", "json", "keyword", "linecache", "locale", "mimetypes",
                  "netrc", "operator", "platform", "pprint", "quopri", "random", "reprlib", "sched", "secrets",
                  "shlex", "shutil", "statistics", "string", "struct", "tempfile", "textwrap", "tokenize",
                  "traceback", "types", "warnings", "weakref", "webbrowser", "zipfile")
QUESTIONS = {  # kind -> (question, answer from the parameter list and the module)
    "params": ("What are the parameters of {name}?", lambda ps, mod: ", ".join(ps)),
    "first": ("What is the first parameter of {name}?", lambda ps, mod: ps[0]),
    "last": ("What is the last parameter of {name}?", lambda ps, mod: ps[-1]),
    "module": ("Which module defines {name}?", lambda ps, mod: mod),
}


@functools.cache
def stdlib_functions(max_signature: int = 60) -> list[tuple[str, str, str, tuple[str, ...]]]:
    """``(module, name, signature, parameters)`` of the public top-level functions of a few stdlib source files
    (read with ``ast``, never imported), sorted: the same list on every rank (cached: do not modify it)."""
    out = []
    for module in STDLIB_MODULES:
        spec = importlib.util.find_spec(module)
        if spec is None or not (spec.origin or "").endswith(".py"):
            continue  # absent from this Python, or frozen / built in
        tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
        for node in tree.body:
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
                continue
            a = node.args
            params = [p.arg for p in a.posonlyargs + a.args]
            params += [f"*{a.vararg.arg}"] if a.vararg else []
            params += [p.arg for p in a.kwonlyargs] + ([f"**{a.kwarg.arg}"] if a.kwarg else [])
            signature = ast.unparse(a)
            if params and len(signature) <= max_signature:
                out.append((module, node.name, signature, params))
    return sorted(set((m, n, s, tuple(p)) for m, n, s, p in out))


def stdlib_qa(n: int, seed: int) -> list[list[dict]]:
    """``n`` chat conversations, deterministic given ``seed``: the user quotes a function's ``def`` line from its
    stdlib file and asks about it; the short answer is read off that line. One in three has a second turn."""
    funcs = stdlib_functions()
    if not funcs:
        raise RecipeError("data.sft.make=stdlib-qa found no standard-library source files in this Python: give "
                          "data.files instead")
    rng = random.Random(seed)
    kinds = sorted(QUESTIONS)
    out = []
    for _ in range(n):
        module, name, signature, params = rng.choice(funcs)
        asked = rng.sample(kinds, 2 if rng.random() < 1 / 3 else 1)
        messages = []
        for j, kind in enumerate(asked):
            question, answer = QUESTIONS[kind]
            text = question.format(name=name)
            if j == 0:
                text = f"{module}.py has:\ndef {name}({signature}):\n{text}"
            messages += [{"role": "user", "content": text},
                         {"role": "assistant", "content": answer(list(params), module)}]
        out.append(messages)
    return out
