"""``seqpar`` command line: ``seqpar env``, ``seqpar demo`` (more subcommands register themselves here)."""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as md
import json
import platform
import sys

import torch

# Subcommands: name -> (module, help). Each module has ``add_arguments(parser)`` and ``run(args) -> int``;
# modules are imported only when their subcommand runs, so `seqpar --help` stays fast.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "env": ("seqpar.cli", "print versions, device, backend and usable attention kernels"),
    "demo": ("seqpar.demo", "exactness demo: sequence-parallel attention on N CPU ranks vs one process"),
    "bench": ("seqpar.bench.cli", "side-by-side benchmarks of the primitives -> results.json + PNG plots"),
    "eval": ("seqpar.eval.cli", "perplexity (sliding window) and passkey retrieval of a local model or LoRA adapter"),
    "generate": ("seqpar.inference.generate", "chat with a local model or run: streamed answer, full or H2O KV cache"),
    "train": ("seqpar.train.cli", "train or fine-tune from a YAML recipe (DeepSpeed, LoRA, sequence parallel)"),
    "merge-lora": ("seqpar.lora_merge", "fold a LoRA checkpoint into a plain transformers model (safetensors)"),
}


def _version(pkg: str) -> str:
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return "not installed"


def env_report() -> dict:
    from seqpar.kernels import available_backends, linear_cpu
    from seqpar.parallel import default_device_backend

    device, backend = default_device_backend()
    return {
        "seqpar": _version("seqpar"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda_build": torch.version.cuda,
        "gpus": torch.cuda.device_count(),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "backend": backend,
        "attention_kernels": available_backends(device),
        "linear_attention_cpu_kernel": linear_cpu.describe(),
        **{pkg: _version(pkg) for pkg in ("transformers", "peft", "deepspeed", "accelerate", "flash-attn", "wandb")},
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    report = env_report()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for key, value in report.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}: {'yes' if ok else 'no'}" for k, ok in value.items())
        print(f"{key:>18}  {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="seqpar", description="Exact sequence parallelism for long-context training.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # `train RECIPE --resume key=value`: argparse stops the overrides at the first flag
        if getattr(args, "overrides", None) is None or any(a.startswith("-") or "=" not in a for a in extra):
            parser.parse_args(argv)  # the usual one-line "unrecognized arguments" error, exit code 2
        args.overrides = [*args.overrides, *extra]
    if args.command is None:
        parser.print_help()
        return 0
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
