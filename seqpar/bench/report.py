"""Ratios against the baseline of the same run, a printed table, and PNG plots."""

from __future__ import annotations

from pathlib import Path

BASELINE = "single_sdpa"


def add_ratios(results: list[dict]) -> list[dict]:
    """time_ratio / mem_ratio of each row against the baseline with the same suite, length and thread count."""
    base = {(r["suite"], r["seq_len"], r["sp"]): r for r in results if r["method"] == BASELINE and "error" not in r}
    for r in results:
        b = base.get((r["suite"], r["seq_len"], r["sp"]))
        if b is None or "error" in r:
            continue
        r["time_ratio"] = r["median_s"] / b["median_s"]
        r["mem_ratio"] = r["peak_mem_bytes"] / max(b["peak_mem_bytes"], 1)
    return results


def table(results: list[dict]) -> str:
    head = f"{'suite':<9} {'method':<18} {'N':>2} {'L':>7} {'median ms':>10} {'x base':>7} {'peak MiB':>9} " \
           f"{'x base':>7} {'sent MiB':>9}"
    lines = [head, "-" * len(head)]
    for r in results:
        if "error" in r:
            lines.append(f"{r['suite']:<9} {r['method']:<18} {r['sp']:>2} {r['seq_len']:>7}  error: {r['error'][:60]}")
            continue
        lines.append(
            f"{r['suite']:<9} {r['method']:<18} {r['sp']:>2} {r['seq_len']:>7} {r['median_s'] * 1e3:>10.1f} "
            f"{r.get('time_ratio', float('nan')):>7.2f} {r['peak_mem_bytes'] / 2**20:>9.1f} "
            f"{r.get('mem_ratio', float('nan')):>7.2f} {r.get('bytes_sent_per_rank', 0) / 2**20:>9.2f}"
        )
    return "\n".join(lines)


def plot(results: list[dict], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for suite in sorted({r["suite"] for r in results}):
        rows = [r for r in results if r["suite"] == suite and "error" not in r]
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for (method, sp) in sorted({(r["method"], r["sp"]) for r in rows}):
            pts = sorted((r["seq_len"], r["median_s"], r["peak_mem_bytes"]) for r in rows
                         if r["method"] == method and r["sp"] == sp)
            label = f"{method} (N={sp})" if method != BASELINE else f"one process, {sp} threads"
            style = "--" if method == BASELINE else "-"
            axes[0].plot([p[0] for p in pts], [p[1] * 1e3 for p in pts], style, marker="o", label=label)
            axes[1].plot([p[0] for p in pts], [p[2] / 2**20 for p in pts], style, marker="o", label=label)
        for ax, ylabel in zip(axes, ("forward+backward, median ms", "peak memory per rank, MiB")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("sequence length L")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
        axes[1].legend(fontsize=7, loc="upper left")
        fig.suptitle(f"seqpar bench: {suite}")
        fig.tight_layout()
        path = out_dir / f"{suite}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
