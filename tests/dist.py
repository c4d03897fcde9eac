"""Test harness: spawn W gloo processes on a free port and collect what each rank returns.

    results = run_ranks(check_ring, 4, args=(cases,))

``fn(rank, world_size, group, *args)`` must be a module-level function of a test module (spawn imports it);
one spawn should run many cases, since each rank spends ~2 s importing torch on these machines. A rank's
exception fails the test with that rank's traceback; a hang fails it after ``timeout`` seconds with the
ranks that never reported, and every child is killed first. The machinery lives in ``seqpar.launcher``
(``seqpar demo`` and ``seqpar bench`` spawn their ranks with it too).
"""

from seqpar.launcher import RankFailed, free_port, spawn_ranks

run_ranks = spawn_ranks

__all__ = ["RankFailed", "free_port", "run_ranks"]
