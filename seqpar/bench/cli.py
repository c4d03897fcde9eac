"""``seqpar bench [suite ...] [--quick] [--out DIR]``: side-by-side benchmarks -> results.json + PNG plots.

``seqpar bench fidelity [--quick] [--seeds N]``: the context-extension fidelity experiment (docs/fidelity.md).
``seqpar bench --markdown docs/benchmarks.md --out DIR`` runs nothing: it rewrites the page's results
section from ``DIR/results.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from seqpar.bench.suites import BASELINES, SUITES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("suites", nargs="*", default=None, help=f"suites to run (default: all of {list(SUITES)})")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, few methods (CI smoke run)")
    parser.add_argument("--out", default="bench-results", help="output folder (default: bench-results)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per configuration (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed warm-up calls per configuration")
    parser.add_argument("--methods", default=None, help="comma-separated subset of methods to run")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds allowed per configuration")
    parser.add_argument("--jobs", type=int, default=1,
                        help="configurations run at a time (default 1: each measured alone; more only for smoke "
                             "runs such as --quick, whose times and peaks then share the machine)")
    parser.add_argument("--max-len", type=int, default=None, help="skip configurations longer than this")
    parser.add_argument("--min-len", type=int, default=None, help="skip configurations shorter than this")
    parser.add_argument("--worlds", default=None, help="comma-separated SP sizes to run (baselines follow them)")
    parser.add_argument("--append", action="store_true",
                        help="add the rows to OUT/results.json instead of replacing it (incremental runs; a "
                             "configuration run again replaces its earlier row)")
    parser.add_argument("--seeds", type=int, default=3, help="fidelity: fine-tuning seeds per method (default 3)")
    parser.add_argument("--markdown", metavar="PAGE", default=None,
                        help="run nothing; rewrite PAGE's results section from OUT/results.json")


def _configs(args: argparse.Namespace) -> list[dict]:
    names = args.suites or list(SUITES)
    unknown = [n for n in names if n not in SUITES]
    if unknown:
        raise SystemExit(f"seqpar bench: unknown suite(s) {unknown}; choose from {list(SUITES)}")
    only = set(args.methods.split(",")) if args.methods else None
    if only is not None:
        import seqpar.bench.hybrid  # (registers the gdn_* and lightning_* methods)
        import seqpar.bench.training  # noqa: F401  (registers the llama_* methods)
        from seqpar.bench.methods import METHODS

        if only - set(METHODS):
            raise SystemExit(f"seqpar bench: unknown method(s) {sorted(only - set(METHODS))} in --methods; "
                             f"choose from {sorted(METHODS)}")
    worlds = {int(w) for w in args.worlds.split(",")} if args.worlds else None
    return [
        {**cfg, "suite": name, "repeats": args.repeats, "warmup": args.warmup}
        for name in names
        for cfg in SUITES[name](args.quick)
        if (only is None or cfg["method"] in only or cfg["method"] in BASELINES)
        and (args.max_len is None or cfg.get("seq_len", 0) <= args.max_len)
        and (args.min_len is None or cfg.get("seq_len", 0) >= args.min_len)
        and (worlds is None or cfg.get("sp") in worlds)
    ]


def run(args: argparse.Namespace) -> int:
    if args.suites == ["fidelity"]:  # an experiment, not timings: seqpar/bench/fidelity.py
        from seqpar.bench.fidelity import run as run_fidelity

        return run_fidelity(args)
    out = Path(args.out)
    if args.markdown:
        from seqpar.bench.markdown import update_page

        update_page(Path(args.markdown), out)
        print(f"wrote {args.markdown} from {out / 'results.json'}")
        return 0
    from tqdm import tqdm

    from seqpar.bench.measure import machine_info
    from seqpar.bench.report import derive, plot, table, target_lines, targets
    from seqpar.bench.runner import run_config

    configs = _configs(args)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    previous = out / "results.json"
    results = json.loads(previous.read_text())["results"] if args.append and previous.exists() else []
    # --append re-measures: a configuration run now replaces its earlier row (never two rows for one config)
    results = [r for r in results if not any(_same_config(r, c) for c in configs)]
    if args.jobs < 1:
        raise SystemExit(f"seqpar bench: --jobs {args.jobs}: pass 1 or more")

    def measure(cfg: dict) -> dict:
        config_started = time.time()
        return {**run_config(cfg, timeout=args.timeout), "config_wall_s": time.time() - config_started,
                "measured_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(config_started))}

    with ThreadPoolExecutor(args.jobs) as pool:  # each configuration runs in its own fresh processes
        results += list(tqdm(pool.map(measure, configs), total=len(configs), desc="seqpar bench", unit="config"))
    derive(results)
    report = {"machine": machine_info(), "quick": args.quick, "seconds": time.time() - started,
              "started_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
              "targets": targets(results), "results": results}
    (out / "results.json").write_text(json.dumps(report, indent=1))
    print(table(results))
    print("\n".join(["", *target_lines(report["targets"])]))
    for path in plot(results, out):
        print(f"wrote {path}")
    print(f"wrote {out / 'results.json'}")
    failed = [r for r in results if "error" in r]
    return 1 if failed and args.quick else 0


# What tells two configurations apart (variants such as packed documents or bf16 are separate methods).
_IDENTITY = ("suite", "method", "world", "threads", "sp", "seq_len", "batch", "model", "engine", "heads",
             "kv_heads", "head_dim", "dtype", "device")


def _same_config(row: dict, cfg: dict) -> bool:
    """The row measured ``cfg`` (repeat counts and fields a suite gained later, e.g. ``flops``, aside)."""
    return all(row.get(k) == cfg.get(k) for k in _IDENTITY) and ("search" in row) == ("search" in cfg)
