"""LASP-2 before/after issue 13's linear-kernel change, side by side in one run (not part of the package).

Loads ``seqpar/kernels/linear.py`` and ``seqpar/attention/lasp2.py`` as they were at a git revision (default
d63d868, the commit before issue 13 changed the kernel) from a temporary folder, and times forward +
backward of ``lasp2_linear_attention`` with them and with the working tree's, on one thread, interleaved,
on the benchmark's shape (batch 1, 8 heads, head_dim 64, float32, decay 0.99) at one rank's share of the
sequence (group=None: the all-gather of a d x d state is not what changed). Prints wall-clock and CPU-time
medians and their ratios (CPU time is steadier on a shared machine).

    python scripts/linear_before_after.py --local-len 16384 --repeats 7
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def load_before(rev: str, folder: Path):
    """The revision's kernel as module ``linear_before`` and its lasp2.py importing it, from ``folder``."""
    def show(path: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:{path}"], check=True, capture_output=True,
                              text=True).stdout

    (folder / "linear_before.py").write_text(show("seqpar/kernels/linear.py"))
    lasp2 = show("seqpar/attention/lasp2.py").replace("from seqpar.kernels.linear import",
                                                       "from linear_before import")
    (folder / "lasp2_before.py").write_text(lasp2)
    sys.path.insert(0, str(folder))
    import lasp2_before

    return lasp2_before.lasp2_linear_attention


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--local-len", type=int, default=16384, help="tokens per rank (global L / N)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rev", default="d63d868", help="git revision of the 'before' kernel")
    args = parser.parse_args()
    torch.set_num_threads(1)
    sys.path.insert(0, str(REPO))
    from seqpar.attention import lasp2_linear_attention

    with tempfile.TemporaryDirectory() as tmp:
        fns = {"before": load_before(args.rev, Path(tmp)), "after": lasp2_linear_attention}
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, args.local_len, 8, 64, generator=g).requires_grad_() for _ in range(3))
        decay = torch.full((8,), 0.99)

        def step(fn) -> tuple[float, float]:
            for t in (q, k, v):
                t.grad = None
            wall, cpu = time.perf_counter(), time.thread_time()
            out = fn(q, k, v, decay=decay)
            out.backward(torch.ones_like(out))
            return time.perf_counter() - wall, time.thread_time() - cpu

        outs = {}
        for name, fn in fns.items():  # warm-up, and the two agree
            step(fn)
            outs[name] = (fn(q, k, v, decay=decay).detach(), q.grad.clone())
        err = max((a - b).abs().max().item() / b.abs().max().item() for a, b in zip(*outs.values()))
        times = {name: [] for name in fns}
        for _ in range(args.repeats):
            for name, fn in fns.items():
                times[name].append(step(fn))
    med = {n: [statistics.median(t[i] for t in ts) for i in (0, 1)] for n, ts in times.items()}
    print(f"lasp2_linear_attention fwd+bwd, L/N = {args.local_len}, B=1 H=8 D=64 fp32 decay 0.99, one thread, "
          f"{args.repeats} interleaved repeats (before = {args.rev}); max rel. difference {err:.1e}")
    for n, (wall, cpu) in med.items():
        print(f"  {n:>6}: wall {wall * 1e3:8.1f} ms   cpu {cpu * 1e3:8.1f} ms")
    (bw, bc), (aw, ac) = med["before"], med["after"]
    print(f"  speed-up: wall {bw / aw:.2f}x, cpu {bc / ac:.2f}x")


if __name__ == "__main__":
    main()
