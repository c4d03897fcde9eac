"""``seqpar generate MODEL --prompt TEXT``: chat with a model, streaming its answer, with the full or the H2O cache.

MODEL is what ``seqpar eval`` loads (``seqpar.eval.cli.load_model``): a model folder, a merged checkpoint, a LoRA
adapter or a seqpar run / checkpoint folder. The prompt (``--prompt``, ``--prompt-file FILE``, or stdin with
``-``) is rendered with the tokenizer's chat template as one user turn (after ``--system`` if given) when the
tokenizer has a template, else used as is after BOS (``--no-chat`` forces that). transformers' ``generate``
decodes it, greedy unless ``--sample``, and ``TextStreamer`` prints the answer to stdout as it comes. The KV
cache is the model's own (``--cache full``) or ``H2OCache`` (``--cache h2o``: SinkLoRA's inference, heavy
hitters + a recent window, ``--heavy`` / ``--recent`` tokens per layer and kv head). The last line, on stderr,
gives the tokens/s and what the cache holds at the end (tokens kept and bytes).

Every bad input is one line on stderr (exit 2) naming the fix. The module imports only the standard library at
load time: ``seqpar --help`` builds every subcommand's parser.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, NoReturn, TextIO

CACHE_KINDS = ("full", "h2o")
DEFAULT_HEAVY = DEFAULT_RECENT = 128  # tokens per layer and kv head: exact for prompts + answers up to 256 tokens
DEFAULT_MAX_NEW = 256  # capped at what the model's context leaves after the prompt


class GenerateError(ValueError):
    """Bad ``seqpar generate`` input: every message names the argument, its value and the fix."""


def cache_budget(kind: str, heavy: int | None, recent: int | None) -> tuple[int, int] | None:
    """The ``(heavy, recent)`` budget that ``--cache KIND --heavy N --recent N`` asks for; None for the full cache.

    Unset budgets take ``DEFAULT_HEAVY`` / ``DEFAULT_RECENT``. Raises GenerateError (one line naming the flag and
    the fix) for an unknown kind, a budget given with ``--cache full``, a negative budget or an empty one.
    """
    if kind not in CACHE_KINDS:
        raise GenerateError(f"--cache {kind!r}: use --cache full (every token) or --cache h2o (heavy hitters + recent)")
    if kind == "full":
        for flag, value in (("--heavy", heavy), ("--recent", recent)):
            if value is not None:
                raise GenerateError(f"{flag} {value} sets the H2O budget: add --cache h2o, or drop {flag}")
        return None
    heavy = DEFAULT_HEAVY if heavy is None else heavy
    recent = DEFAULT_RECENT if recent is None else recent
    for flag, value in (("--heavy", heavy), ("--recent", recent)):
        if value < 0:
            raise GenerateError(f"{flag} {value}: use a number of tokens >= 0 (default {DEFAULT_HEAVY})")
    if heavy + recent < 1:
        raise GenerateError("--heavy 0 --recent 0 keeps no token: keep at least one, e.g. --recent 1")
    return heavy, recent


def add_cache_arguments(parser: argparse.ArgumentParser) -> None:
    """``--cache full|h2o --heavy N --recent N`` (shared by ``seqpar generate`` and ``seqpar eval``)."""
    parser.add_argument("--cache", default="full", metavar="full|h2o",
                        help="KV cache: full (every token, the default) or h2o (heavy hitters + recent window)")
    parser.add_argument("--heavy", type=int, default=None,
                        help=f"H2O: heavy-hitter tokens kept per layer and kv head (default {DEFAULT_HEAVY})")
    parser.add_argument("--recent", type=int, default=None,
                        help=f"H2O: most recent tokens kept per layer and kv head (default {DEFAULT_RECENT})")


def _one_line_error(prog: str):
    def error(message: str) -> NoReturn:  # argparse's own errors too: one line, no usage block
        print(f"{prog}: error: {message} (see {prog} --help)", file=sys.stderr)
        raise SystemExit(2)

    return error


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="local folder: HF model, merged checkpoint, LoRA adapter, or a seqpar run / "
                        "checkpoint folder (loaded as seqpar eval loads it)")
    parser.add_argument("--prompt", help="the prompt text ('-' reads stdin)")
    parser.add_argument("--prompt-file", metavar="FILE", help="read the prompt from a UTF-8 file ('-' = stdin)")
    parser.add_argument("--system", help="a system message before the prompt (chat template only)")
    parser.add_argument("--no-chat", action="store_true", help="use the prompt as is, without the chat template")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help=f"tokens to generate at most (default {DEFAULT_MAX_NEW}, capped at the model's context)")
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=None, help="with --sample (default 0.7)")
    parser.add_argument("--top-p", type=float, default=None, help="with --sample: nucleus mass (default 0.9)")
    parser.add_argument("--seed", type=int, default=None, help="with --sample: random seed (default 0)")
    add_cache_arguments(parser)
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                        help="auto: bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.error = _one_line_error(parser.prog)


def sampling_settings(args: argparse.Namespace) -> dict | None:
    """``{"temperature", "top_p"}`` and the seed for ``--sample``; None for greedy. Sampling flags need --sample."""
    given = [f for f, v in (("--temperature", args.temperature), ("--top-p", args.top_p), ("--seed", args.seed))
             if v is not None]
    if not args.sample:
        if given:
            raise GenerateError(f"{given[0]} applies to sampling: add --sample (greedy decoding is the default)")
        return None
    temperature = 0.7 if args.temperature is None else args.temperature
    top_p = 0.9 if args.top_p is None else args.top_p
    if not temperature > 0:
        raise GenerateError(f"--temperature {temperature}: use a temperature > 0 (lower = closer to greedy)")
    if not 0 < top_p <= 1:
        raise GenerateError(f"--top-p {top_p}: use 0 < --top-p <= 1 (1 = no nucleus cut)")
    return {"temperature": temperature, "top_p": top_p, "seed": 0 if args.seed is None else args.seed}


def read_prompt(prompt: str | None, prompt_file: str | None, stdin: TextIO) -> str:
    """The prompt text from ``--prompt``, ``--prompt-file`` or stdin (``-``); one trailing newline is dropped."""
    from seqpar.eval.perplexity import read_text

    if prompt is not None and prompt_file is not None:
        raise GenerateError("pass the prompt once: --prompt TEXT or --prompt-file FILE, not both")
    if prompt is None and prompt_file is None:
        raise GenerateError("no prompt: pass --prompt TEXT, --prompt-file FILE, or --prompt - to read stdin")
    if "-" in (prompt, prompt_file):
        text, source = stdin.read(), "stdin"
    elif prompt_file is not None:
        text, source = read_text(prompt_file, arg="--prompt-file"), prompt_file  # missing / not UTF-8 / empty
    else:
        text, source = prompt, "--prompt"
    if source != "--prompt" and text.endswith("\n"):
        text = text[:-1]  # editors and `echo` end the text with one
    if not text.strip():
        raise GenerateError(f"the prompt ({source}) is empty: give the model some text to answer")
    return text


def render_prompt(tokenizer: Any, text: str, *, chat: bool, system: str | None) -> tuple[list[int], bool]:
    """Token ids of the prompt and whether the chat template rendered it (one user turn + the generation
    prompt); without a template: BOS (when the tokenizer has one) + the text, as ``seqpar eval`` tokenizes."""
    if chat and getattr(tokenizer, "chat_template", None):
        from jinja2 import TemplateError

        turns = ([{"role": "system", "content": system}] if system is not None else [])
        try:
            rendered = tokenizer.apply_chat_template([*turns, {"role": "user", "content": text}],
                                                     tokenize=False, add_generation_prompt=True)
        except TemplateError as err:
            raise GenerateError(f"the tokenizer's chat template refuses the prompt ({err}); "
                                f"{'drop --system' if system is not None else 'pass --no-chat'}") from None
        return tokenizer(rendered, add_special_tokens=False)["input_ids"], True  # the template writes BOS
    if system is not None:
        why = "--no-chat is set" if not chat else "the tokenizer has no chat template"
        raise GenerateError(f"--system needs the chat template but {why}: drop --system (or put it in the prompt)")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + ids, False


def new_token_budget(n_prompt: int, max_new: int | None, limit: int | None) -> int:
    """How many tokens to generate: ``--max-new-tokens`` (default ``DEFAULT_MAX_NEW``) within the context
    ``limit`` (the model's max_position_embeddings) left after ``n_prompt`` prompt tokens."""
    if limit is None:
        return DEFAULT_MAX_NEW if max_new is None else max_new
    room = limit - n_prompt
    if room < 1:
        raise GenerateError(f"the prompt is {n_prompt} tokens and the model's context (max_position_embeddings) is "
                            f"{limit}: shorten the prompt to fewer than {limit} tokens")
    if max_new is None:
        return min(DEFAULT_MAX_NEW, room)
    if max_new > room:
        raise GenerateError(f"--max-new-tokens {max_new}: the prompt ({n_prompt} tokens) + {max_new} exceeds the "
                            f"model's context of {limit} positions; use --max-new-tokens <= {room}")
    return max_new


def _streamer(tokenizer: Any, out: TextIO) -> Any:
    """transformers' TextStreamer writing to ``out``, noting when the first new token arrived."""
    from transformers import TextStreamer

    class TimedStreamer(TextStreamer):
        first_token_at: float | None = None

        def put(self, value):
            if not self.next_tokens_are_prompt and self.first_token_at is None:  # the first put() is the prompt
                self.first_token_at = time.perf_counter()
            super().put(value)

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            out.write(text + ("\n" if stream_end else ""))
            out.flush()

    return TimedStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def generate_text(model: Any, tokenizer: Any, ids: list[int], *, max_new_tokens: int,
                  sampling: dict | None = None, budget: tuple[int, int] | None = None,
                  stream: TextIO | None = None) -> dict:
    """Generate after the prompt ``ids`` with the full cache (``budget`` None) or ``H2OCache(*budget)``.

    Returns ``{"tokens": new ids, "text", "seconds", "first_token_s" (None without ``stream``), "tokens_per_s",
    "cache": seqpar.inference.h2o.kv_footprint at the end}``. Stops at EOS (the model's and the tokenizer's).
    """
    import torch
    from transformers import GenerationConfig

    from seqpar.inference.h2o import CACHE_KWARG, kv_footprint, new_cache

    cache = new_cache(model, budget)
    eos = model.generation_config.eos_token_id
    eos = sorted({*([] if eos is None else [eos] if isinstance(eos, int) else eos), tokenizer.eos_token_id} - {None})
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    sample = {k: v for k, v in (sampling or {}).items() if k != "seed"}
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=sampling is not None, eos_token_id=eos or None,
                              pad_token_id=pad, **sample)
    if sampling is not None:
        torch.manual_seed(sampling["seed"])
    streamer = _streamer(tokenizer, stream) if stream is not None else None
    prompt = torch.tensor([ids], device=next(model.parameters()).device)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=config,
                             streamer=streamer, return_dict_in_generate=True,
                             **({} if cache is None else {CACHE_KWARG: cache}))
    seconds = time.perf_counter() - t0
    new = out.sequences[0, len(ids) :].tolist()
    first = None if streamer is None or streamer.first_token_at is None else streamer.first_token_at - t0
    return {"tokens": new, "text": tokenizer.decode(new, skip_special_tokens=True), "seconds": seconds,
            "first_token_s": first, "tokens_per_s": len(new) / seconds, "cache": kv_footprint(out.get(CACHE_KWARG))}


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def stats_line(res: dict, budget: tuple[int, int] | None) -> str:
    """``seqpar generate: N tokens in S s = R tokens/s (first token after F ms); KV cache KIND: T tokens x L layers
    = B`` (T: kept per layer and kv head at the end; B: keys + values, plus H2O's bookkeeping when there is some)."""
    c = res["cache"]
    first = f" (first token after {res['first_token_s'] * 1000:.0f} ms)" if res["first_token_s"] is not None else ""
    kind = "full" if budget is None else f"h2o (heavy {budget[0]} + recent {budget[1]})"
    extra = f" + {_size(c['extra_bytes'])} of H2O scores" if c["extra_bytes"] else ""
    return (f"seqpar generate: {len(res['tokens'])} tokens in {res['seconds']:.2f} s = {res['tokens_per_s']:.1f} "
            f"tokens/s{first}; KV cache {kind}: {c['tokens']} tokens x {c['layers']} layers = "
            f"{_size(c['bytes'])}{extra}")


def chat(args: argparse.Namespace, stdin: TextIO, stdout: TextIO) -> tuple[dict, tuple[int, int] | None]:
    """Check every flag, read the prompt, load the model, generate (streaming to ``stdout``)."""
    from seqpar.eval.cli import load_model

    budget = cache_budget(args.cache, args.heavy, args.recent)
    sampling = sampling_settings(args)
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise GenerateError(f"--max-new-tokens {args.max_new_tokens}: use a positive number of tokens")
    text = read_prompt(args.prompt, args.prompt_file, stdin)  # before the (slow) model load
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" would share stderr with the answer's last line
    model, tokenizer, _ = load_model(args.model, dtype=args.dtype, device=args.device)
    ids, _ = render_prompt(tokenizer, text, chat=not args.no_chat, system=args.system)
    n_new = new_token_budget(len(ids), args.max_new_tokens, getattr(model.config, "max_position_embeddings", None))
    if budget is not None:
        from seqpar.inference.h2o import use_h2o_attention

        try:
            use_h2o_attention(model)
        except ValueError as err:  # a model whose attention cannot be swapped
            raise GenerateError(str(err)) from None
    try:
        res = generate_text(model, tokenizer, ids, max_new_tokens=n_new, sampling=sampling, budget=budget,
                            stream=stdout)
    except RuntimeError as err:  # an attention that does not hand its probabilities to the cache
        if not str(err).startswith("H2OCache"):
            raise
        raise GenerateError(f"{' '.join(str(err).split())} (or use --cache full)") from None
    return res, budget


def run(args: argparse.Namespace) -> int:
    from seqpar.eval import EvalError

    try:
        res, budget = chat(args, sys.stdin, sys.stdout)
    except (GenerateError, EvalError) as err:
        print(f"seqpar generate: error: {err}", file=sys.stderr)
        return 2
    print(stats_line(res, budget), file=sys.stderr)
    return 0
