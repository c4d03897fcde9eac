"""Derived figures (ratios against the baseline of the same run, tokens/s, TFLOP/s), the targets, tables
(plain text for the terminal, Markdown for docs/benchmarks.md) and PNG plots."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from seqpar.bench.suites import BASELINES

# RSS moves in pages and allocator arenas: peaks under 1 MiB are noise, not a denominator.
MEM_RESOLUTION = 1 << 20


def _key(r: dict) -> tuple:
    return r["suite"], r["seq_len"], r["sp"], r.get("model"), r.get("device"), r.get("engine")


def label(r: dict) -> str:
    """The method's name, with the engine it ran in if any (e2e rows with and without ZeRO-3)."""
    return r["method"] + (f" +{r['engine']}" if r.get("engine") else "")


def derive(results: list[dict]) -> list[dict]:
    """Add time_ratio / mem_ratio (vs the baseline with the same suite, L, SP, model), tokens/s, TFLOP/s."""
    timed = [r for r in results if "median_s" in r]
    base = {_key(r): r for r in timed if r["method"] in BASELINES}
    for r in timed:
        r["tokens_per_s"] = r.get("batch", 1) * r["seq_len"] / r["median_s"]
        if "flops" in r:
            r["tflops"] = r["flops"] / r["median_s"] / 1e12
        b = base.get(_key(r))
        if b is not None:
            r["time_ratio"] = r["median_s"] / b["median_s"]
            if b["peak_mem_bytes"] >= MEM_RESOLUTION:  # below it the baseline's peak is RSS noise
                r["mem_ratio"] = r["peak_mem_bytes"] / b["peak_mem_bytes"]
    _versus(timed)
    for r in timed:
        if r["suite"] == "memory":  # issue 28: the peak above the inputs in units of the local q [B, L/N, H, D]
            local_q = r.get("batch", 1) * r["seq_len"] // r["sp"] * r["heads"] * r["head_dim"]
            held = r["peak_work_bytes"] if r.get("live_peak") else r["peak_mem_bytes"]  # live: above the inputs
            r["units"] = held / (local_q * _ITEMSIZE[r["dtype"]])
    return results


_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}


def _versus(timed: list[dict]) -> None:
    """Rows naming a ``versus`` method (issue 24's windows: the same call without a window) get its ratios of
    the same run: ``versus_time_ratio``, ``versus_bytes_ratio`` (bytes sent per rank), ``versus_mem_ratio``."""
    rows = {(_key(r), r["method"]): r for r in timed}
    for r in timed:
        other = rows.get((_key(r), r.get("versus")))
        if other is None:
            continue
        r["versus_time_ratio"] = r["median_s"] / other["median_s"]
        if r.get("bytes_sent_per_rank") is not None and other.get("bytes_sent_per_rank"):
            r["versus_bytes_ratio"] = r["bytes_sent_per_rank"] / other["bytes_sent_per_rank"]
        if other["peak_mem_bytes"] >= MEM_RESOLUTION:
            r["versus_mem_ratio"] = r["peak_mem_bytes"] / other["peak_mem_bytes"]


def _versus_cell(r: dict) -> str:
    figures = [f"{r[k]:.2f}x {what}" for k, what in (("versus_time_ratio", "time"), ("versus_bytes_ratio", "sent"),
                                                      ("versus_mem_ratio", "peak")) if k in r]
    return f"vs {r['versus']}: {', '.join(figures)}" if figures else ""


# ------------------------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class Target:
    """``value = metric(numerator row) / metric(denominator row)`` at ``seq_len``, compared with ``bound``."""

    name: str
    suite: str
    numerator: tuple[str, int]  # (method, SP)
    denominator: tuple[str, int]
    metric: str  # "median_s", "peak_mem_bytes", "bytes_sent_per_rank" or "tflops"
    op: str  # "<=" or ">="
    bound: float
    seq_len: int | None  # None: the longest length both rows have


TARGETS = (
    Target("ring_attention N=2 time vs one process (2 threads)", "softmax", ("ring_zigzag", 2),
           ("single_sdpa", 2), "median_s", "<=", 1.10, 16384),
    Target("ring_attention N=2 peak memory vs one process", "softmax", ("ring_zigzag", 2), ("single_sdpa", 2),
           "peak_mem_bytes", "<=", 0.60, 16384),
    Target("ring_attention N=2 time vs DeepSpeed-Ulysses", "softmax", ("ring_zigzag", 2),
           ("deepspeed_ulysses", 2), "median_s", "<=", 1.0, 16384),
    Target("lasp2 speed-up over lasp1 at N=4", "linear", ("lasp1", 4), ("lasp2", 4), "median_s", ">=", 1.15, None),
    Target("shift_short_attention speed-up over full attention", "longlora", ("single_sdpa", 1), ("s2", 1),
           "median_s", ">=", 3.0, 16384),
    # Issue 13: packing and the masked paths reach the fused kernels (decompose, then fuse).
    Target("packed ring (8 documents of L/8) vs unpacked ring, N=2", "softmax", ("ring_packed", 2),
           ("ring_zigzag", 2), "median_s", "<=", 0.35, 8192),
    Target("packed ring (8 documents of L/8) vs unpacked ring, N=2", "softmax", ("ring_packed", 2),
           ("ring_zigzag", 2), "median_s", "<=", 0.35, 16384),
    Target("allgather_attention vs ring_attention, N=2", "softmax", ("allgather", 2), ("ring_zigzag", 2),
           "median_s", "<=", 1.15, 16384),
    Target("sink_shift_attention vs shift_short_attention, N=2", "longlora", ("sf", 2), ("s2", 2), "median_s",
           "<=", 1.15, 16384),
    Target("Llama-3-shaped toy, one step at L=8192: peak with fused loss + tiled MLP vs full logits", "scaling",
           ("llama3_seqpar_memory", 1), ("llama3_seqpar", 1), "peak_mem_bytes", "<=", 0.25, 8192),
    Target("lasp2 N=2 rate on its own FLOPs vs one-thread fp32 matmul rate", "linear", ("lasp2", 2),
           ("matmul_rate", 1), "tflops", ">=", 0.5, 32768),
    # Issue 22: the hybrids' linear layers by LASP-2 (one all-gather of state maps) at L = 32k.
    Target("Gated DeltaNet LASP-2 N=2 time vs one process (2 threads)", "hybrid", ("gdn_lasp2", 2),
           ("gdn_single", 2), "median_s", "<=", 1.15, 32768),
    Target("Gated DeltaNet LASP-2 N=2 peak memory vs one process", "hybrid", ("gdn_lasp2", 2), ("gdn_single", 2),
           "peak_mem_bytes", "<=", 0.6, 32768),
    Target("Gated DeltaNet LASP-2 N=4 time vs the head all-to-all", "hybrid", ("gdn_lasp2", 4), ("gdn_a2a", 4),
           "median_s", "<=", 1.0, 32768),
    # Issue 23: a Kimi Delta Attention rule and a Mamba2 scan by the same mechanism.
    Target("Kimi Delta Attention LASP-2 N=2 time vs one process (2 threads)", "hybrid", ("kda_lasp2", 2),
           ("kda_single", 2), "median_s", "<=", 1.15, 32768),
    Target("Kimi Delta Attention LASP-2 N=2 peak memory vs one process", "hybrid", ("kda_lasp2", 2),
           ("kda_single", 2), "peak_mem_bytes", "<=", 0.6, 32768),
    Target("Mamba2 SSD LASP-2 N=2 time vs one process (2 threads)", "hybrid", ("ssd_lasp2", 2),
           ("ssd_single", 2), "median_s", "<=", 1.15, 32768),
    Target("Mamba2 SSD LASP-2 N=2 peak memory vs one process", "hybrid", ("ssd_lasp2", 2),
           ("ssd_single", 2), "peak_mem_bytes", "<=", 0.6, 32768),
    Target("Lightning LASP-2 N=2 time vs one process (2 threads)", "hybrid", ("lightning_lasp2", 2),
           ("lightning_single", 2), "median_s", "<=", 1.15, 32768),
    Target("Lightning LASP-2 N=2 peak memory vs one process", "hybrid", ("lightning_lasp2", 2),
           ("lightning_single", 2), "peak_mem_bytes", "<=", 0.6, 32768),
    Target("Lightning LASP-2 N=4 time vs the head all-to-all", "hybrid", ("lightning_lasp2", 4),
           ("lightning_a2a", 4), "median_s", "<=", 1.0, 32768),
    # Issue 28: the primitives' own memory falls with N, S2/SF hold no more than full attention.
    Target("ring_attention N=4 peak memory vs one process", "softmax", ("ring_zigzag", 4), ("single_sdpa", 4),
           "peak_mem_bytes", "<=", 0.35, 16384),
    Target("shift_short_attention peak memory vs full attention, one process", "longlora", ("s2", 1),
           ("single_sdpa", 1), "peak_mem_bytes", "<=", 1.0, 16384),
    Target("sink_shift_attention peak memory vs full attention, one process", "longlora", ("sf", 1),
           ("single_sdpa", 1), "peak_mem_bytes", "<=", 1.0, 16384),
    # Issue 24: a window of 4096 tokens ships only its halo and computes only its band.
    Target("ring N=4 window 4096 time vs the same call without a window", "softmax", ("ring_window4096", 4),
           ("ring_zigzag", 4), "median_s", "<=", 0.4, 32768),
    Target("ring N=4 window 4096 bytes sent vs the same call without a window", "softmax", ("ring_window4096", 4),
           ("ring_zigzag", 4), "bytes_sent_per_rank", "<=", 0.5, 32768),
)


def _rows(results: list[dict], t: Target, side: tuple[str, int]) -> dict[int, dict]:
    return {r["seq_len"]: r for r in results if r.get("suite") == t.suite and "median_s" in r
            and (r["method"], r["sp"]) == side}


def evaluate_target(results: list[dict], t: Target) -> dict:
    num, den = _rows(results, t, t.numerator), _rows(results, t, t.denominator)
    common = sorted(set(num) & set(den))
    out = {"name": t.name, "op": t.op, "bound": t.bound, "target_seq_len": t.seq_len}
    if not common:
        return {**out, "missing": f"no {t.suite} rows for both {t.numerator} and {t.denominator}"}
    L = t.seq_len if t.seq_len in common else common[-1]
    floor = MEM_RESOLUTION if t.metric == "peak_mem_bytes" else 1e-9
    if den[L][t.metric] < floor:
        return {**out, "seq_len": L, "missing": f"{t.denominator} {t.metric} at L={L} is below the resolution"}
    value = num[L][t.metric] / den[L][t.metric]
    ok = value <= t.bound if t.op == "<=" else value >= t.bound
    return {**out, "seq_len": L, "value": value, "pass": ok, "at_target_length": t.seq_len in (None, L)}


def targets(results: list[dict]) -> list[dict]:
    return [evaluate_target(results, t) for t in TARGETS] + longest_context_targets(results) + \
        unit_targets(results)


# Issue 28: ring attention's own memory per rank, fwd + bwd, at L = 16k (what a ring must hold: output, lse,
# dq/dk/dv, two K/V blocks and two dK/dV blocks in flight, one block's temporaries).
UNIT_TARGETS = ((("ring_zigzag", 2), 11.0), (("ring_zigzag", 4), 11.0))


def unit_targets(results: list[dict]) -> list[dict]:
    """The memory suite's peaks in units of the local q against UNIT_TARGETS (absolute, not ratios)."""
    out = []
    for (method, n), bound in UNIT_TARGETS:
        e = {"name": f"{method} N={n} peak memory in units of the local q", "op": "<=", "bound": bound,
             "target_seq_len": 16384, "unit": " u"}
        rows = {r["seq_len"]: r for r in results if r.get("suite") == "memory" and "units" in r
                and (r["method"], r["sp"]) == (method, n)}
        if not rows:
            out.append({**e, "missing": "no memory suite row"})
            continue
        L = 16384 if 16384 in rows else max(rows)
        value = rows[L]["units"]
        out.append({**e, "seq_len": L, "value": value, "pass": value <= bound, "at_target_length": L == 16384})
    return out


def longest_context_targets(results: list[dict]) -> list[dict]:
    """Issue 14: seqpar's longest L with the memory options >= ALST's, and >= 0.9 N x its own N = 1."""
    best = {(r["method"], r["sp"]): r["max_seq_len"] for r in results
            if r.get("suite") == "scaling" and "search" in r and r.get("max_seq_len")}
    out = []
    for n in (1, 2, 4):
        ours, alst, one = best.get(("llama3_seqpar_memory", n)), best.get(("llama3_alst", n)), \
            best.get(("llama3_seqpar_memory", 1))
        for name, den, bound in ((f"longest L with memory options vs DeepSpeed ALST, N={n}", alst, 1.0),
                                 (f"longest L with memory options at N={n} vs N x own N=1", one and n * one, 0.9)):
            if n == 1 and "own" in name:
                continue
            e = {"name": name, "op": ">=", "bound": bound, "target_seq_len": None}
            if not ours or not den:
                out.append({**e, "missing": "no llama3 search rows for both"})
                continue
            out.append({**e, "seq_len": ours, "value": ours / den, "pass": ours / den >= bound,
                        "at_target_length": True})
    return out


def target_lines(evaluated: list[dict]) -> list[str]:
    lines = []
    for e in evaluated:
        if "missing" in e:
            lines.append(f"TARGET {e['name']} {e['op']} {e['bound']:.2f}: not measured ({e['missing']})")
            continue
        verdict = "PASS" if e["pass"] else "FAIL"
        if not e["at_target_length"]:
            verdict += f" (measured at L={e['seq_len']}, target is L={e['target_seq_len']}: not conclusive)"
        value = f"{e['value']:.2f}{e.get('unit', 'x')}"  # a ratio, or units of the local q (issue 28)
        lines.append(f"TARGET {e['name']}: {value} ({e['op']} {e['bound']:.2f}) at L={e['seq_len']}: {verdict}")
    return lines


# ------------------------------------------------------------------------------------------- tables


def _f(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _mib(value) -> float | None:
    return None if value is None else value / 2**20


# (header, width, cell) per column; one list for the terminal table and the Markdown one.
TIMED: list[tuple[str, int, Callable[[dict], str]]] = [
    ("suite", 9, lambda r: r["suite"]), ("method", 30, label), ("N", 2, lambda r: str(r["sp"])),
    ("L", 7, lambda r: str(r["seq_len"])), ("median ms", 10, lambda r: _f(r["median_s"] * 1e3, ".1f")),
    ("x base", 6, lambda r: _f(r.get("time_ratio"), ".2f")),
    ("peak MiB", 9, lambda r: _f(_mib(r["peak_mem_bytes"]), ".1f")),
    ("x base", 6, lambda r: _f(r.get("mem_ratio"), ".2f")),
    ("sent MiB", 9, lambda r: _f(_mib(r.get("bytes_sent_per_rank")), ".2f")),
    ("tokens/s", 9, lambda r: _f(r["tokens_per_s"], ".0f")),
    ("extra", 12, lambda r: (f"{r['tflops']:.1f} TFLOP/s" if r["tflops"] >= 1 else f"{r['tflops'] * 1e3:.1f} GFLOP/s")
        if "tflops" in r else
        (f"loss {r['loss']:.5f}" if "loss" in r else _versus_cell(r) if "versus" in r else
         f"{r['units']:.1f} u of local q" if "units" in r else "")),
]
SEARCH: list[tuple[str, int, Callable[[dict], str]]] = [
    ("suite", 9, lambda r: r["suite"]), ("method", 30, lambda r: r["method"]), ("N", 2, lambda r: str(r["sp"])),
    ("budget MiB", 10, lambda r: _f(_mib(r["search"]["budget_bytes"]), ".0f")),
    ("max L", 8, lambda r: _f(r["max_seq_len"], "d")), ("limited by", 10, lambda r: r["limited_by"]),
    ("probes (L: peak MiB)", 20, lambda r: ", ".join(f"{p['seq_len']}: {_mib(p['peak_mem_bytes']):.0f}"
                                                      for p in r["probes"])),
]


def _kind(r: dict) -> str:
    return "error" if "error" in r else "skipped" if "skipped" in r else "search" if "search" in r else "timed"


def _render(columns, rows: list[dict], markdown: bool) -> list[str]:
    if markdown:
        lines = ["| " + " | ".join(h for h, _, _ in columns) + " |", "|" + "---|" * len(columns)]
        return lines + ["| " + " | ".join(cell(r) for _, _, cell in columns) + " |" for r in rows]
    head = " ".join(f"{h:>{w}}" for h, w, _ in columns)
    return [head, "-" * len(head)] + [" ".join(f"{cell(r):>{w}}" for _, w, cell in columns) for r in rows]


def table(results: list[dict], *, markdown: bool = False) -> str:
    """Timed rows, then memory-budget searches, then failed or skipped configurations."""
    lines = []
    for kind, columns in (("timed", TIMED), ("search", SEARCH)):
        rows = [r for r in results if _kind(r) == kind]
        if rows:
            lines += [*_render(columns, rows, markdown), ""]
    for r in results:
        if _kind(r) in ("error", "skipped"):
            what = f"error: {r['error']}" if "error" in r else f"skipped: {r['skipped']}"
            lines.append(f"{'- ' if markdown else ''}{r['suite']} {r['method']} N={r['sp']} L={r.get('seq_len')}: "
                         f"{what}")
    return "\n".join(lines).rstrip()


# ------------------------------------------------------------------------------------------- plots


def _series(rows: list[dict], x: str, y: Callable[[dict], float], *, per_sp: bool = True) -> dict[str, list]:
    """Points ``(r[x], y(r))`` grouped by method (and SP size unless it is the x axis)."""
    series: dict[str, list[tuple]] = {}
    for r in rows:
        engine = f" +{r['engine']}" if r.get("engine") else ""
        if r["method"] in BASELINES:
            name = f"one process, {r['threads']} threads{engine}" if per_sp else f"one process{engine}"
        else:
            name = f"{label(r)} (N={r['sp']})" if per_sp else label(r)
        series.setdefault(name, []).append((r[x], y(r)))
    return {k: sorted(v) for k, v in series.items()}


def _panels(suite: str, rows: list[dict]) -> list[tuple[str, str, dict]]:
    """(x label, y label, series) per panel: longest L and tokens/s vs N for scaling, TFLOP/s vs L for gpu,
    time and memory vs L otherwise."""
    search = [r for r in rows if _kind(r) == "search" and r["max_seq_len"]]
    timed = [r for r in rows if _kind(r) == "timed"]
    panels = []
    if search:
        panels.append(("SP size N", "longest L within the memory budget",
                       _series(search, "sp", lambda r: r["max_seq_len"], per_sp=False)))
    if timed and suite == "scaling":
        panels.append(("SP size N", "tokens/s (one training step)",
                       _series(timed, "sp", lambda r: r["tokens_per_s"], per_sp=False)))
    elif timed and suite == "gpu":
        panels.append(("sequence length L", "TFLOP/s (forward + backward)",
                       _series(timed, "seq_len", lambda r: r["tflops"])))
    elif timed:
        panels.append(("sequence length L", "forward+backward, median ms",
                       _series(timed, "seq_len", lambda r: r["median_s"] * 1e3)))
        panels.append(("sequence length L", "peak memory per rank, MiB",
                       _series(timed, "seq_len", lambda r: max(r["peak_mem_bytes"], 1) / 2**20)))
    return panels


def plot(results: list[dict], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for suite in sorted({r["suite"] for r in results}):
        panels = _panels(suite, [r for r in results if r["suite"] == suite])
        if not panels:
            continue
        fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
        for ax, (xlabel, ylabel, series) in zip(axes[0], panels):
            for name, pts in series.items():
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "--" if "one process" in name else "-",
                        marker="o", label=name)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set(xlabel=xlabel, ylabel=ylabel)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7, loc="upper left")
        fig.suptitle(f"seqpar bench: {suite}")
        fig.tight_layout()
        path = out_dir / f"{suite}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
