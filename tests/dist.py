"""Test harness: start W gloo processes on a free port and collect what each rank returns.

    results = run_ranks(check_ring, 4, args=(cases,))

``fn(rank, world_size, group, *args)`` must be a module-level function of a test module (the rank imports it);
one call should run many cases. A rank's exception fails the test with that rank's traceback; a hang fails it
after ``timeout`` seconds with the ranks that never reported, and every child is killed first. The machinery
lives in ``seqpar.launcher`` (``seqpar demo`` and ``seqpar bench`` spawn their ranks with it too).

The ranks are forked from multiprocessing's fork server, which imports torch, torch.distributed and transformers
once for the whole session (tests/conftest.py starts it before the first test, in the session's environment):
a freshly spawned interpreter spends ~2-3 s of CPU on those imports per rank, ~90 ranks per suite. Each rank is
still a process of its own that imports its test module and starts its own process group; it inherits only the
server's imports, never a test's state. The fork server's environment is the session's at its start (a
variable a test sets later does not reach the ranks, as it would not under ``seqpar.launcher``'s spawn either
unless set before the call: no test here relies on that).
"""

import multiprocessing as mp
import multiprocessing.forkserver
import os

from seqpar.launcher import RankFailed, free_port, spawn_ranks

START_METHOD = os.environ.get("SEQPAR_TEST_START_METHOD", "forkserver")  # "spawn": fresh interpreters
PRELOAD = ["torch", "torch.distributed", "transformers", "seqpar.launcher"]


def start_fork_server() -> None:
    """Start the fork server now (its environment and imports are fixed from here on)."""
    if START_METHOD == "forkserver":
        mp.get_context(START_METHOD).set_forkserver_preload(PRELOAD)
        multiprocessing.forkserver.ensure_running()


def run_ranks(fn, world_size: int, args: tuple = (), **kwargs):
    return spawn_ranks(fn, world_size, args, start_method=START_METHOD, **kwargs)


__all__ = ["RankFailed", "free_port", "run_ranks", "start_fork_server"]
