"""``seqpar bench fidelity``: does fine-tuning with S2-Attn / SF-Attn reach what full-attention fine-tuning does?

A toy-scale reproduction of LongLoRA's (Chen et al. 2024, Table 1) and SinkLoRA's (Zhang 2024, Tables 1-2)
context-extension comparison, through the trainer and recipes users run (``recipes/fidelity/*.yaml``):

1. corpus: the Python standard library's own ``.py`` files (every machine has them), split by file into
   train (90 %) and held-out (10 %); the byte tokenizer of ``seqpar.train.data``; a quarter of the training
   windows are passkey prompts (LongLoRA's format) so that the retrieval task exists at toy scale;
2. pre-train a tiny Llama at ``L0`` tokens (full attention, ``recipes/fidelity/pretrain.yaml``);
3. extend it to ``4 L0`` with linear position interpolation by LoRA+ under full attention, S2-Attn, SF-Attn
   and the variants (``recipes/fidelity/extend-*.yaml``, 2 SP ranks under torchrun), same windows, steps,
   tokens and optimiser for all; ``data.pack=false`` and windows of exactly one file each, so no method sees
   a document boundary (S2/SF take none);
4. evaluate every model, and the pre-trained one with interpolation but no fine-tuning, with full attention
   at ``4 L0``: held-out sliding-window perplexity exactly as ``seqpar eval --ppl heldout.txt --context 4L0``,
   perplexity by position bucket, passkey accuracy at ``L0``, ``2 L0``, ``4 L0`` (``seqpar.eval.passkey``).

The training steps' ``attention_calls`` are checked: a run whose layers did not run its attention fails.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import sysconfig
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "recipes" / "fidelity"
PASSKEY_SHARE = 4  # one training window in PASSKEY_SHARE is a passkey prompt


@dataclass
class Method:
    """One extension run: a recipe plus overrides; ``attention`` is the name ``attention_calls`` must show."""

    name: str
    recipe: str
    attention: str
    overrides: list[str] = field(default_factory=list)
    label: str = ""


CORE = [Method("full", "extend-full.yaml", "full", label="full attention (ring over 2 ranks)"),
        Method("s2", "extend-s2.yaml", "s2", label="S2-Attn (no wrap: shifted back, half groups at the ends)"),
        Method("sf", "extend-sf.yaml", "sf", label="SF-Attn (4 sinks)")]
VARIANTS = [Method("s2-wrap", "extend-s2.yaml", "s2", ["attention.s2_wrap=true"],
                   label="S2-Attn with wrap-around (LongLoRA's pseudocode roll)"),
            Method("sf-1", "extend-sf.yaml", "sf", ["attention.num_sink_tokens=1"], label="SF-Attn, 1 sink"),
            Method("sf-16", "extend-sf.yaml", "sf", ["attention.num_sink_tokens=16"], label="SF-Attn, 16 sinks")]


@dataclass
class Size:
    """Everything the run's size depends on (``--quick``: the smallest that exercises every stage)."""

    model: dict
    l0: int = 256
    factor: int = 4
    pretrain_steps: int = 600
    pretrain_batch: int = 8  # per DP rank
    pretrain_lr: float = 3e-3
    extend_steps: int = 100
    extend_batch: int = 4
    extend_lr: float = 2e-3
    eval_tokens: int = 32768
    passkey_trials: int = 10
    variants: bool = True

    @property
    def length(self) -> int:
        return self.l0 * self.factor


FULL = Size(model={"hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 4,
                   "num_attention_heads": 4, "num_key_value_heads": 4})
QUICK = Size(model={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                    "num_key_value_heads": 2},
             l0=128, pretrain_steps=6, pretrain_batch=2, extend_steps=3, extend_batch=1, eval_tokens=1024,
             passkey_trials=2, variants=False)


# ----------------------------------------------------------------------------------------------------------
# Corpus


def stdlib_files() -> list[Path]:
    """The standard library's ``.py`` files that are ASCII text, sorted (site-packages excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for p in sorted(root.rglob("*.py")):
        if "site-packages" in p.parts or "dist-packages" in p.parts:
            continue
        try:
            p.read_text(encoding="ascii")
        except (UnicodeDecodeError, OSError):
            continue
        out.append(p)
    if len(out) < 20:
        raise SystemExit(f"seqpar bench fidelity: found {len(out)} ASCII .py files under {root}; the corpus needs "
                         "the Python standard library's sources")
    return out


def split_files(files: list[Path]) -> tuple[list[Path], list[Path]]:
    """(train, held-out): a file is held out when crc32 of its name mod 10 is 0 (stable across machines)."""
    held = [p for p in files if zlib.crc32(p.name.encode()) % 10 == 0]
    return [p for p in files if p not in set(held)], held


def windows_of(files: list[Path], length: int) -> list[str]:
    """Consecutive ``length - 1``-character windows of each file (+ </s> = ``length`` byte tokens each)."""
    out = []
    for p in files:
        text = p.read_text(encoding="ascii")
        out += [text[i : i + length - 1] for i in range(0, len(text) - length + 2, length - 1)]
    return out


def passkey_texts(tokenizer: Any, length: int, n: int, seed: int) -> list[str]:
    """``n`` passkey prompts of ``length`` tokens with their answers (seqpar.train.data's format), as text."""
    from seqpar.train.data import passkey_sample

    rng = random.Random(seed)
    return [tokenizer.decode(passkey_sample(tokenizer, length, rng, rng.random())["input_ids"][:-1].tolist(),
                             skip_special_tokens=False) for _ in range(n)]


def write_corpus(out: Path, size: Size, n_train: dict[int, int]) -> dict:
    """train-<L>.jsonl for each length L (n_train[L] lines, one window or passkey prompt each) and heldout.txt."""
    from seqpar.train.data import byte_tokenizer

    tok = byte_tokenizer()
    train, held = split_files(stdlib_files())
    out.mkdir(parents=True, exist_ok=True)
    info: dict = {"train_files": len(train), "heldout_files": len(held), "files": {}}
    for length, n in n_train.items():
        code = windows_of(train, length)
        random.Random(length).shuffle(code)
        n_key = n // PASSKEY_SHARE
        texts = code[: n - n_key] + passkey_texts(tok, length, n_key, seed=length)
        random.Random(length + 1).shuffle(texts)
        path = out / f"train-{length}.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        info["files"][length] = {"path": str(path), "windows": len(texts), "passkey": n_key,
                                 "available_code_windows": len(code)}
    text = "\n".join(p.read_text(encoding="ascii") for p in held)[: size.eval_tokens]
    (out / "heldout.txt").write_text(text)
    info["heldout_tokens"] = len(text) + 1  # + <s>
    return info


# ----------------------------------------------------------------------------------------------------------
# Training (torchrun subprocesses, exactly as a user runs the recipes)


def torchrun(recipe: Path, overrides: list[str], out: Path, *, nproc: int = 2, timeout: float = 3600) -> float:
    """Run ``seqpar train`` on ``nproc`` CPU ranks; returns its wall time; raises with the log's tail on failure."""
    from seqpar.launcher import free_port

    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), "-m", "seqpar", "train", str(recipe), f"trainer.output_dir={out}", *overrides]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return time.perf_counter() - t0


def read_metrics(run: Path, attention: str, tokens_per_step: int) -> dict:
    """Loss, step time and attention calls from metrics.jsonl; raises if a step ran another attention than
    ``attention`` (the guard against training s2/sf recipes with full attention, issue 17)."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "loss" in r]
    calls: dict[str, int] = {}
    for r in records:
        ran = r.get("attention_calls") or {}
        if set(ran) != {attention}:
            raise RuntimeError(f"{run}: step {r.get('step')} ran attention {ran}, expected only {attention!r}: the "
                               "recipe did not train with the attention it names")
        for k, v in ran.items():
            calls[k] = calls.get(k, 0) + v
    return {"final_loss": records[-1]["loss"], "steps": len(records), "attention_calls": calls,
            "train_s": sum(tokens_per_step / r["tokens_per_s"] for r in records),  # the steps, not start-up
            "losses": [round(r["loss"], 4) for r in records]}


def size_overrides(size: Size) -> list[str]:
    return [f"model.from_config.{k}={v}" for k, v in size.model.items()] + [
        f"model.from_config.max_position_embeddings={size.l0}"]


def pretrain(out: Path, size: Size, corpus: dict) -> tuple[Path, dict]:
    run = out / "pretrain"
    merged = run / "merged"
    overrides = [*size_overrides(size), f"data.files=[{corpus['files'][size.l0]['path']}]",
                 f"data.seq_len={size.l0}", f"trainer.max_steps={size.pretrain_steps}",
                 f"trainer.micro_batch={size.pretrain_batch}", f"trainer.lr={size.pretrain_lr}",
                 f"trainer.warmup_steps={max(1, size.pretrain_steps // 20)}"]
    wall = torchrun(RECIPES / "pretrain.yaml", overrides, run)
    info = {**read_metrics(run, "full", size.l0 * size.pretrain_batch * 2), "wall_s": wall}  # 2 DP ranks
    from seqpar.lora_merge import merge_lora

    merge_lora(run, merged)
    return merged, info


def extend(out: Path, size: Size, corpus: dict, base: Path, method: Method, seed: int) -> tuple[Path, dict]:
    run = out / f"extend-{method.name}-seed{seed}"
    if run.exists():
        shutil.rmtree(run)
    overrides = [f"model.path={base}", f"data.files=[{corpus['files'][size.length]['path']}]",
                 f"data.seq_len={size.length}", f"trainer.max_steps={size.extend_steps}",
                 f"trainer.micro_batch={size.extend_batch}", f"trainer.lr={size.extend_lr}",
                 f"trainer.warmup_steps={max(1, size.extend_steps // 10)}", f"trainer.seed={seed}",
                 *method.overrides]
    wall = torchrun(RECIPES / method.recipe, overrides, run)
    info = {**read_metrics(run, method.attention, size.length * size.extend_batch), "wall_s": wall}
    from seqpar.lora_merge import merge_lora

    merge_lora(run, run / "merged")
    return run / "merged", info


# ----------------------------------------------------------------------------------------------------------
# Evaluation (one process, full attention, the merged models)


def load_extended(folder: Path, length: int) -> Any:
    """A merged model (or the pre-trained one, interpolated x4 here) for evaluation at ``length`` tokens."""
    from transformers import AutoModelForCausalLM

    from seqpar.train.model import apply_rope_scaling, folder_config
    from seqpar.train.recipe import load_recipe

    config = folder_config(folder, False)
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type")) != "linear":  # the no-fine-tuning baseline: interpolation only
        apply_rope_scaling(load_recipe(RECIPES / "extend-full.yaml", [f"data.seq_len={length}"]), config)
    model = AutoModelForCausalLM.from_pretrained(folder, config=config, dtype=torch.float32).eval()
    # Linear interpolation makes `length` positions valid; the saved config still names the original range.
    model.config.max_position_embeddings = max(model.config.max_position_embeddings, length)
    return model


@torch.no_grad()
def position_nll(model: Any, ids: torch.Tensor, *, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL and count per position inside the window (``[context]`` each), over the disjoint windows of
    ``seqpar.eval.perplexity.windows``: their sums are ``sliding_window_nll(model, ids, context=context,
    stride=context)`` (the test checks), split by how much context each scored token had."""
    from seqpar.eval.perplexity import windows

    nll, count = torch.zeros(context, dtype=torch.float64), torch.zeros(context, dtype=torch.float64)
    for begin, end, first in windows(ids.numel(), context=context, stride=context):
        window = ids[begin:end][None]
        logits = model(input_ids=window).logits[0]
        logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
        pos = torch.arange(first - begin, end - begin)  # positions of the scored targets inside the window
        nll[pos] -= logp[pos - 1].gather(-1, window[0, pos][:, None])[:, 0].double()
        count[pos] += 1
    return nll, count


def reference_ppl(folder: Path, tokenizer: Any, text: str, l0: int) -> float:
    """The pre-trained model at its own context (no interpolation): what a 4x model must beat to be using
    the context beyond ``l0``."""
    from transformers import AutoModelForCausalLM

    from seqpar.eval.perplexity import tokenize_stream

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    nll, count = position_nll(model, tokenize_stream(tokenizer, text), context=l0)
    return math.exp(nll.sum() / count.sum())


def evaluate_model(model: Any, tokenizer: Any, text: str, size: Size, seed: int) -> dict:
    from seqpar.eval.passkey import passkey_accuracy
    from seqpar.eval.perplexity import tokenize_stream

    ids = tokenize_stream(tokenizer, text)
    nll, count = position_nll(model, ids, context=size.length)
    bucket = size.l0
    buckets = [{"from": b, "to": b + bucket, "ppl": math.exp(nll[b : b + bucket].sum() / count[b : b + bucket].sum())}
               for b in range(0, size.length, bucket)]
    lengths = [size.l0 * k for k in (1, 2, 4) if size.l0 * k <= size.length]
    passkey = {str(n): passkey_accuracy(model, tokenizer, length=n, trials=size.passkey_trials, seed=seed)["accuracy"]
               for n in lengths}
    return {"nll": float(nll.sum() / count.sum()), "ppl": math.exp(nll.sum() / count.sum()),
            "tokens": int(count.sum()), "buckets": buckets, "passkey": passkey}


# ----------------------------------------------------------------------------------------------------------
# The whole experiment


def run_experiment(out: Path, *, quick: bool, seeds: int, size: Size | None = None, log=None) -> dict:
    """Corpus, pre-training, every method x seed, evaluation; returns what fidelity.json holds."""
    from seqpar.train.data import byte_tokenizer

    size = size or (QUICK if quick else FULL)
    log = log or (lambda line: print(line, flush=True))
    methods = CORE + (VARIANTS if size.variants else [])
    started = time.time()
    n_pre = size.pretrain_steps * size.pretrain_batch * 2
    n_ext = size.extend_steps * size.extend_batch
    corpus = write_corpus(out / "corpus", size, {size.l0: n_pre, size.length: n_ext})
    log(f"corpus: {corpus['train_files']} train / {corpus['heldout_files']} held-out files")
    base, pre_info = pretrain(out, size, corpus)
    log(f"pre-trained in {pre_info['wall_s']:.0f} s, final loss {pre_info['final_loss']:.3f}")
    tok, text = byte_tokenizer(), (out / "corpus" / "heldout.txt").read_text()
    pre_info["ppl_at_l0"] = reference_ppl(base, tok, text, size.l0)
    runs = [{"method": "base", "seed": s, **evaluate_model(load_extended(base, size.length), tok, text, size, s)}
            for s in range(seeds)]
    for seed in range(seeds):
        for m in methods:
            merged, info = extend(out, size, corpus, base, m, seed)
            runs.append({"method": m.name, "seed": seed, **info,
                         **evaluate_model(load_extended(merged, size.length), tok, text, size, seed)})
            log(f"seed {seed} {m.name:>8}: ppl {runs[-1]['ppl']:.3f}, train {info['train_s']:.0f} s "
                f"(wall {info['wall_s']:.0f} s), attention {info['attention_calls']}")
            shutil.rmtree(merged.parent / "checkpoints", ignore_errors=True)
            (out / "runs.partial.json").write_text(json.dumps(runs, indent=1))  # survives a killed run
    result = {"quick": quick, "seeds": seeds, "size": asdict(size), "corpus": corpus, "pretrain": pre_info,
              "methods": {m.name: m.label for m in methods}, "runs": runs,
              "started_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
              "minutes": (time.time() - started) / 60}
    result["summary"] = summarize(result)
    return result


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarize(result: dict) -> dict:
    """Per method: mean and SD over seeds of perplexity, recovered fraction, passkey accuracy, training time.

    Recovered fraction (SinkLoRA's measure) per seed: (ppl_base - ppl_m) / (ppl_base - ppl_full)."""
    by = {}
    for r in result["runs"]:
        by.setdefault(r["method"], {})[r["seed"]] = r
    out = {}
    for name, seeds in by.items():
        rows = [seeds[s] for s in sorted(seeds)]
        rec = [(by["base"][s]["ppl"] - r["ppl"]) / (by["base"][s]["ppl"] - by["full"][s]["ppl"])
               for s, r in sorted(seeds.items()) if s in by.get("full", {}) and name != "base"]
        out[name] = {"ppl": _mean_sd([r["ppl"] for r in rows]),
                     "recovered": _mean_sd(rec) if rec else None,
                     "passkey": {n: _mean_sd([r["passkey"][n] for r in rows]) for n in rows[0]["passkey"]},
                     "buckets": [statistics.fmean(r["buckets"][i]["ppl"] for r in rows)
                                 for i in range(len(rows[0]["buckets"]))],
                     "train_s": _mean_sd([r.get("train_s", 0.0) for r in rows])}
    return out


# ----------------------------------------------------------------------------------------------------------
# Report: table, plot, docs page

BEGIN = "<!-- fidelity-results:begin (written by `seqpar bench fidelity --markdown`: edits in here are overwritten) -->"
END = "<!-- fidelity-results:end -->"


def _pm(ms: tuple[float, float] | None, fmt: str = ".3f") -> str:
    return "-" if ms is None else f"{ms[0]:{fmt}} ± {ms[1]:{fmt}}"


def table(result: dict) -> str:
    summ, size = result["summary"], result["size"]
    keys = list(next(iter(summ.values()))["passkey"])
    lines = [f"| method | ppl @ {size['l0'] * size['factor']} | recovered | "
             + " | ".join(f"passkey @ {n}" for n in keys) + " | train s |",
             "|---|---|---|" + "---|" * len(keys) + "---|"]
    for name in ["base", *result["methods"]]:
        if name not in summ:
            continue
        s = summ[name]
        lines.append(f"| {name} | {_pm(s['ppl'])} | {_pm(s['recovered'], '.2f')} | "
                     + " | ".join(_pm(s["passkey"][n], ".2f") for n in keys)
                     + f" | {'-' if name == 'base' else _pm(s['train_s'], '.1f')} |")
    n = len(next(iter(summ.values()))["buckets"])
    lines += ["", "| method | " + " | ".join(f"ppl, tokens {i * size['l0']}-{(i + 1) * size['l0'] - 1}"
                                           for i in range(n)) + " |", "|---|" + "---|" * n]
    lines += [f"| {name} | " + " | ".join(f"{b:.3f}" for b in summ[name]["buckets"]) + " |"
              for name in ["base", *result["methods"]] if name in summ]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    size = result["size"]
    for name, s in result["summary"].items():
        xs = [size["l0"] * (i + 0.5) for i in range(len(s["buckets"]))]
        ax.plot(xs, s["buckets"], marker="o", label=name, linestyle="--" if name == "base" else "-")
    ax.axvline(size["l0"], color="grey", linewidth=0.8)
    ax.set_xlabel("position in the window (tokens); grey: the pre-training context")
    ax.set_ylabel("held-out perplexity (bucket mean over seeds)")
    ax.set_title(f"Context extension {size['l0']} -> {size['l0'] * size['factor']}, {result['seeds']} seed(s)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown(result: dict, png: str) -> str:
    size, pre = result["size"], result["pretrain"]
    kind = "--quick" if result["quick"] else "full" if size == asdict(FULL) else "reduced"
    return "\n".join([
        f"Run of {result['started_utc']} ({kind}, {result['seeds']} seed(s), "
        f"{result['minutes']:.0f} min): model {size['model']}, pre-training {size['pretrain_steps']} steps x "
        f"{2 * size['pretrain_batch']} x {size['l0']} tokens (final loss {pre['final_loss']:.3f}), extension "
        f"{size['extend_steps']} steps x {size['extend_batch']} x {size['l0'] * size['factor']} tokens per method, "
        + (f"pre-trained model at its own {size['l0']}-token context (no interpolation): ppl "
           f"{pre['ppl_at_l0']:.3f}, " if "ppl_at_l0" in pre else "") +
        f"{result['runs'][0]['tokens']} held-out tokens, {size['passkey_trials']} passkey trials per length. "
        "Mean ± SD over seeds; train s: the optimizer steps' time (no start-up).",
        "", table(result), "", f"![perplexity by position]({png})", ""])


def update_page(page: Path, result: dict, png: Path) -> None:
    body = markdown(result, os.path.relpath(png, page.parent))
    text = page.read_text() if page.exists() else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + BEGIN + "\n" + body + "\n" + END + rest.split(END, 1)[1]
    else:
        text += f"\n{BEGIN}\n{body}\n{END}\n"
    page.write_text(text)


def run(args: argparse.Namespace) -> int:
    """``seqpar bench fidelity``: run (or, with --markdown, only report) and write OUT/fidelity.json + PNG."""
    out = Path(args.out)
    if args.markdown:
        result = json.loads((out / "fidelity.json").read_text())
        page = Path(args.markdown)
        png = page.parent / "fidelity.png"
        plot(result, png)
        update_page(page, result, png)
        print(f"wrote {page} and {png} from {out / 'fidelity.json'}")
        return 0
    if args.seeds < 1:
        raise SystemExit(f"seqpar bench fidelity: --seeds {args.seeds}: use --seeds >= 1")
    out.mkdir(parents=True, exist_ok=True)
    result = run_experiment(out, quick=args.quick, seeds=args.seeds)
    (out / "fidelity.json").write_text(json.dumps(result, indent=1))
    png = plot(result, out / "fidelity.png")
    print(table(result))
    print(f"wrote {out / 'fidelity.json'} and {png}")
    return 0
