"""Run many ``seqpar ...`` command lines as written, each in a process of its own, paying the imports once.

    python -m tests.forked_commands SPEC.json     (SPEC: {"commands": [[argv...], ...], "out": folder})

This process imports what the ``seqpar`` console script imports (``seqpar.cli`` and, through its parser, every
subcommand's module) and then forks one child per command line: the child is what ``seqpar ARGS`` would be from
there on (``sys.argv`` as the console script sees it, ``seqpar.cli.main(ARGS)``, its exit code the process's),
with its stdout and stderr in files of its own. A command costs its own work (a dry run: ~0.5 s) instead of the
~5 s of CPU a fresh interpreter spends importing torch, transformers and DeepSpeed. Children run one at a time,
in order, in this process's working directory and environment; each finds the parent's state as it was after the
imports (nothing a command does reaches the next one). ``out/results.json`` lists ``{"argv", "returncode",
"seconds"}`` per command; ``out/<i>.out`` and ``out/<i>.err`` hold command i's output.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path


def _child(argv: list[str], out: Path, err: Path) -> int:
    for fd, path in ((1, out), (2, err)):
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(handle, fd)
        os.close(handle)
    from seqpar.cli import main

    sys.argv = [shutil.which(argv[0]) or argv[0], *argv[1:]]  # what the console script's process sees
    try:
        code = main(argv[1:])
    except SystemExit as stop:  # argparse's errors, and run() functions that exit
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        if not isinstance(stop.code, (int, type(None))):
            print(stop.code, file=sys.stderr)
    except BaseException:  # the traceback a failing console script prints, exit code 1
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    return int(code)


# What ``seqpar train`` imports when it runs (seqpar/train/cli.py imports them inside its functions)
PRELOAD = ("seqpar.attention.registry", "seqpar.attention.usp", "seqpar.models.families", "seqpar.parallel",
           "seqpar.train.checkpoint", "seqpar.train.faults", "seqpar.train.model", "seqpar.train.planner",
           "seqpar.train.quiet", "seqpar.train.trainer", "seqpar.train.validate")


def run(spec: dict) -> list[dict]:
    import importlib

    from seqpar.cli import build_parser

    build_parser()  # imports every subcommand's module
    for name in PRELOAD:  # torch, transformers, DeepSpeed, PEFT, accelerate: the ~5 s a command would spend
        importlib.import_module(name)
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for i, argv in enumerate(spec["commands"]):
        assert argv[0] == "seqpar", argv
        sys.stdout.flush()
        sys.stderr.flush()
        t0 = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = _child(argv, out / f"{i}.out", out / f"{i}.err")
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        results.append({"argv": argv, "returncode": os.waitstatus_to_exitcode(status),
                        "seconds": time.perf_counter() - t0})
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    run(json.loads(Path(sys.argv[1]).read_text()))
