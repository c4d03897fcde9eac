"""``seqpar eval MODEL --ppl FILE --context 512,1024 [--stride S] --passkey --lengths 256,512 [--json OUT]
[--cache full|h2o --heavy N --recent N]``.

MODEL is a local folder: a plain or merged Hugging Face checkpoint, a seqpar run folder or checkpoint (or its
``adapter/``: the trained model with the run's RoPE scaling, as ``seqpar merge-lora`` builds it), or another
LoRA adapter (peft), whose base (``base_model_name_or_path`` in adapter_config.json) must be local too; the
adapter is merged for speed.
Prints a table and optionally writes the same numbers as JSON. ``--cache h2o`` runs both evaluations through
SinkLoRA's H2O KV cache (passkey: generation as ``seqpar generate --cache h2o`` does it; perplexity: token by
token through the cache), and every row reports what the KV cache held (tokens per layer, bytes).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from seqpar.eval import EvalError
from seqpar.inference.generate import GenerateError, add_cache_arguments, cache_budget


def _int_list(arg: str):
    def parse(text: str) -> list[int]:
        try:
            values = [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{arg} {text!r}: use comma-separated integers, e.g. 512,1024") from None
        if not values or min(values) < 1:
            raise argparse.ArgumentTypeError(f"{arg} {text!r}: use positive integers, e.g. 512,1024")
        return values

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="local folder: HF model, merged checkpoint, LoRA adapter, or a seqpar run / "
                        "checkpoint folder (the trained model with its RoPE scaling)")
    parser.add_argument("--ppl", metavar="FILE", help="UTF-8 text file for sliding-window perplexity")
    parser.add_argument("--context", type=_int_list("--context"), default=[512],
                        help="window lengths, comma-separated (default: 512; e.g. 512,1024)")
    parser.add_argument("--stride", type=int, default=None, help="tokens between windows (default: --context)")
    parser.add_argument("--passkey", action="store_true", help="passkey retrieval accuracy")
    parser.add_argument("--lengths", type=_int_list("--lengths"), default=[256],
                        help="passkey lengths, comma-separated (default: 256; e.g. 256,512)")
    parser.add_argument("--trials", type=int, default=10, help="passkey trials per length")
    parser.add_argument("--seed", type=int, default=0, help="passkey key/depth seed")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                        help="auto: bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--json", metavar="OUT", help="also write the results as JSON to OUT")
    add_cache_arguments(parser)


def load_model(path: str, *, dtype: str = "auto", device: str | None = None) -> tuple[Any, Any, str]:
    """(model in eval mode, tokenizer, kind) from a local folder; kind is "model", "lora" or "checkpoint" (a seqpar
    run folder, checkpoint or checkpoint adapter: the trained model, rebuilt as ``seqpar merge-lora`` does)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(path)
    if not folder.is_dir():
        raise EvalError(f"MODEL {path!r} is not a local folder; pass a Hugging Face model, merged checkpoint or "
                        "LoRA adapter folder (no hub access)")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(
        dtype, torch.bfloat16 if device.startswith("cuda") else torch.float32)
    from seqpar.train.trained import checkpoint_of

    ckpt = checkpoint_of(folder)
    if ckpt is not None:  # a run, a checkpoint or its adapter/: exactly the trained model (RoPE scaling included)
        from seqpar.train.recipe import RecipeError
        from seqpar.train.trained import load_trained

        try:
            model = load_trained(ckpt, dtype=torch_dtype)
        except RecipeError as err:
            raise EvalError(str(err)) from None
        tok = ckpt / "tokenizer" if (ckpt / "tokenizer").is_dir() else None
        if tok is None:
            raise EvalError(f"checkpoint {ckpt} has no tokenizer/ folder: merge it (seqpar merge-lora) and pass "
                            "the merged folder with its tokenizer")
        return model.to(device).eval(), AutoTokenizer.from_pretrained(tok), "checkpoint"
    adapter = folder / "adapter_config.json"
    if not (folder / "config.json").is_file() and not adapter.is_file():
        raise EvalError(f"MODEL {path!r} holds no config.json, adapter_config.json or seqpar checkpoint: pass a "
                        "Hugging Face model folder, a merged checkpoint, a LoRA adapter, or a seqpar run folder")
    if not adapter.is_file():
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype)
        return model.to(device).eval(), AutoTokenizer.from_pretrained(folder), "model"
    base = json.loads(adapter.read_text()).get("base_model_name_or_path")
    if not base or not Path(base).is_dir():
        raise EvalError(f"MODEL {path!r} is a LoRA adapter whose base_model_name_or_path={base!r} is not a local "
                        "folder; edit adapter_config.json to point at the local base model, or pass a merged "
                        "checkpoint")
    from peft import PeftModel

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch_dtype)
    model = PeftModel.from_pretrained(model, folder).merge_and_unload()  # merged: plain forward, same math
    has_tok = any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
    return model.to(device).eval(), AutoTokenizer.from_pretrained(folder if has_tok else base), "lora"


def evaluate(args: argparse.Namespace) -> dict:
    """Run what ``args`` asks for; returns the JSON-ready results (raises EvalError on bad input)."""
    from seqpar.eval.passkey import passkey_accuracy
    from seqpar.eval.perplexity import check_context, perplexity, read_text

    if args.ppl is None and not args.passkey:
        raise EvalError("nothing to evaluate: pass --ppl FILE and/or --passkey")
    try:
        budget = cache_budget(args.cache, args.heavy, args.recent)
    except GenerateError as err:
        raise EvalError(str(err)) from None
    text = read_text(args.ppl) if args.ppl is not None else None  # fail on a bad file before loading a model
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights": an error after the load stays one line on stderr
    model, tokenizer, kind = load_model(args.model, dtype=args.dtype, device=args.device)
    for length in args.context if text is not None else []:
        check_context(model, length, arg="--context")
    for length in args.lengths if args.passkey else []:
        check_context(model, length, arg="--lengths")
    if budget is not None:
        from seqpar.inference.h2o import use_h2o_attention

        try:
            use_h2o_attention(model)
        except ValueError as err:
            raise EvalError(str(err)) from None
    cache = {"kind": args.cache, **({"heavy": budget[0], "recent": budget[1]} if budget else {})}
    out: dict = {"model": str(args.model), "kind": kind, "cache": cache, "perplexity": [], "passkey": []}
    if text is not None:
        out["file"] = str(args.ppl)
        out["perplexity"] = [perplexity(model, tokenizer, text, context=c, stride=args.stride, budget=budget)
                             for c in args.context]
    if args.passkey:
        out["passkey"] = [passkey_accuracy(model, tokenizer, length=n, trials=args.trials, seed=args.seed,
                                           budget=budget) for n in args.lengths]
    return out


def format_table(res: dict) -> str:
    c = res["cache"]
    cache = "full" if c["kind"] == "full" else f"h2o, heavy {c['heavy']} + recent {c['recent']} tokens"
    lines = [f"model: {res['model']} ({res['kind']}); KV cache: {cache}"]
    kv = lambda r: f"{r['kv_tokens']:>10} {r['kv_bytes'] / 1024:>9.1f}"  # noqa: E731
    if res["perplexity"]:
        lines += [f"perplexity on {res['file']}",
                  f"{'context':>8} {'stride':>7} {'tokens':>9} {'nll':>8} {'ppl':>10} {'kv tokens':>10} {'kv KiB':>9}"]
        lines += [f"{r['context']:>8} {r['stride']:>7} {r['tokens']:>9} {r['nll']:>8.4f} {r['ppl']:>10.3f} {kv(r)}"
                  for r in res["perplexity"]]
    if res["passkey"]:
        lines += ["passkey retrieval",
                  f"{'length':>8} {'trials':>7} {'correct':>8} {'accuracy':>9} {'kv tokens':>10} {'kv KiB':>9}"]
        lines += [f"{r['length']:>8} {r['trials']:>7} {r['correct']:>8} {r['accuracy']:>9.3f} {kv(r)}"
                  for r in res["passkey"]]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        res = evaluate(args)
    except EvalError as err:
        print(f"seqpar eval: error: {err}", file=sys.stderr)
        return 2
    print(format_table(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
        print(f"wrote {args.json}")
    return 0
