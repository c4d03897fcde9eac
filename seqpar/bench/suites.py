"""Benchmark suites: which configurations run side by side, at full and at ``--quick`` sizes.

Every SP configuration uses N processes with one thread each; its baseline is one process with N threads on
the whole sequence, so both sides use the same number of threads. ``--quick`` is the CI smoke run: tiny
lengths and a few methods per suite (the full run covers every method).
"""

from __future__ import annotations

SHAPE = {"batch": 1, "heads": 8, "kv_heads": 8, "head_dim": 64, "dtype": "float32", "causal": True}
# Rows every ratio is taken against (one process, the whole sequence): attention and model-level.
BASELINES = ("single_sdpa", "llama_single", "gdn_single", "kda_single", "ssd_single", "lightning_single",
             "qwen3next_single")


def _grid(methods_by_world: dict[int, list[str]], lengths: list[int], base: dict, baseline: str) -> list[dict]:
    configs = []
    for L in lengths:
        for world, methods in methods_by_world.items():
            configs.append({**base, "seq_len": L, "method": baseline, "world": 1, "threads": world, "sp": world})
            for m in methods:
                configs.append({**base, "seq_len": L, "method": m, "world": world, "threads": 1, "sp": world})
    return configs


# Issue 24: each sliding-window method and the same call without a window (its row's ``versus``).
WINDOW_VERSUS = {"ring_window_L8": "ring_zigzag", "ring_window4096": "ring_zigzag",
                 "ring_contiguous_window4096": "ring_contiguous"}


def softmax(quick: bool) -> list[dict]:
    if quick:
        configs = _grid({2: ["ring_zigzag", "deepspeed_ulysses", "torch_ring"]}, [128], SHAPE, "single_sdpa")
        # a window of L/8 = 16 tokens: the halo exchange, compared with ring_zigzag of the same run
        return configs + windows([128], {2: ["ring_window_L8"]})
    lengths = [2048, 4096, 8192, 16384]
    peers = ["deepspeed_ulysses", "torch_ring"]
    ours = ["ring_zigzag", "ring_contiguous", "rsa", "ulysses", "allgather"]
    # packed documents (8 of L/8, and mixed lengths) and bf16 inputs, at N = 2
    extra = ["ring_packed", "ring_packed_mixed", "allgather_packed", "ring_zigzag_bf16", "allgather_bf16"]
    configs = _grid({2: ours + extra + peers, 4: [*ours, "usp", *peers]}, lengths, SHAPE, "single_sdpa")
    # Ring Self-Attention holds (L/N) x L scores per head: past 8k it is the paper's memory wall, not a benchmark.
    configs = [c for c in configs if not (c["method"] == "rsa" and c["seq_len"] > 8192)]
    # Windows from 8k (a 4096 window is a real one there) to 32k, where the calls without a window are added
    # for the ratios (no one-process baseline at 32k: the windows' ratios are against the unwindowed ring).
    methods = list(WINDOW_VERSUS)
    extra_32k = [{**SHAPE, "seq_len": 32768, "method": m, "world": n, "threads": 1, "sp": n}
                 for n in (2, 4) for m in ("ring_zigzag", "ring_contiguous")]
    return configs + windows([8192, 16384], {2: methods, 4: methods}) + extra_32k + \
        windows([32768], {2: methods, 4: methods})


def windows(lengths: list[int], methods_by_world: dict[int, list[str]]) -> list[dict]:
    """Sliding-window rows (no baselines of their own): each names the unwindowed method it is compared with."""
    return [{**SHAPE, "seq_len": L, "method": m, "world": n, "threads": 1, "sp": n, "versus": WINDOW_VERSUS[m]}
            for L in lengths for n, methods in methods_by_world.items() for m in methods]


def linear(quick: bool) -> list[dict]:
    """LASP-2/LASP-1 (and ring softmax attention for scale); LASP-2 rows carry the kernel's own FLOPs per
    rank (``linear_attention_flops``), and one ``matmul_rate`` row times torch.mm of two n x n float32
    matrices on one thread, the machine rate LASP-2's is compared with (a target at L = 32k, N = 2). It runs
    in two processes at once (world 2; each its own mm, sp 1), as busy as the N = 2 rows it is compared with."""
    from seqpar.kernels.linear import linear_attention_flops

    base = {**SHAPE, "decay": 0.99}
    lengths = [128] if quick else [4096, 16384, 32768, 65536]
    if quick:
        configs = _grid({2: ["lasp2", "lasp1"]}, lengths, base, "single_sdpa")
    else:
        methods = ["lasp2", "lasp1", "ring_contiguous"]
        configs = _grid({2: methods, 4: methods}, lengths, base, "single_sdpa")
    for c in configs:
        if c["method"] == "lasp2":
            c["flops"] = linear_attention_flops(c["batch"], c["heads"], c["seq_len"] // c["sp"], c["head_dim"],
                                                c["head_dim"])
    n = 256 if quick else 2048
    rate = {"method": "matmul_rate", "seq_len": 128 if quick else 32768, "world": 2, "threads": 1, "sp": 1,
            "mm_size": n, "flops": 2.0 * n**3}
    return [*configs, rate]


def longlora(quick: bool) -> list[dict]:
    lengths = [128] if quick else [4096, 8192, 16384]
    base = {**SHAPE, "group_size_ratio": 0.25}
    single = [{**base, "seq_len": L, "method": m, "world": 1, "threads": 1, "sp": 1}
              for L in lengths for m in (("single_sdpa", "s2") if quick else ("single_sdpa", "s2", "sf"))]
    if quick:
        return single
    return single + _grid({2: ["s2", "sf"]}, lengths, base, "single_sdpa")


def e2e(quick: bool) -> list[dict]:
    """A tiny Llama training step at SP = 2: seqpar's patched attention vs DeepSpeed's HF Ulysses, bare
    (forward + loss + backward) and inside a ZeRO-3 engine (+ optimizer step) for every method alike.
    (--quick: bare only; tests/test_bench.py runs the ZeRO-3 path.)"""
    base = {"batch": 1, "model": "tiny"}
    if quick:
        return _grid({2: ["llama_ring", "llama_deepspeed_ulysses"]}, [128], base, "llama_single")
    methods = ["llama_ring", "llama_ulysses", "llama_deepspeed_ulysses"]
    lengths = [2048, 8192, 16384]
    return _grid({2: methods}, lengths, base, "llama_single") + \
        _grid({2: methods}, lengths, {**base, "engine": "zero3"}, "llama_single")


def scaling(quick: bool) -> list[dict]:
    """Longest L within a per-rank memory budget (SP = 1, 2, 4), and tokens/s of the quick-start model."""
    search = {"start": 128, "max_len": 1024, "budget_bytes": 48 << 20, "refine": 0} if quick else \
        {"start": 1024, "max_len": 1 << 20, "budget_bytes": 1 << 30, "refine": 2}
    series = [("llama_ring", 1), ("llama_s2", 2)] if quick else \
        [(m, n) for m in ("llama_ring", "llama_ring_ckpt", "llama_s2") for n in (1, 2, 4)]
    rows = [{"batch": 1, "model": "tiny", "method": m, "world": n, "threads": 1, "sp": n, "search": search}
            for m, n in series]
    if quick:  # the throughput rows below run the same code as the e2e rows: the smoke run skips them
        return rows
    rows += longest_context()
    # Tokens/s of recipes/quickstart-cpu.yaml's model at its fixed length, one rank vs two (and, for
    # reference, the same two cores in one process).
    base = {"batch": 4, "model": "quickstart", "seq_len": 512, "threads": 1}
    rows += [{**base, "method": "llama_ring", "world": n, "sp": n} for n in (1, 2)]
    return [*rows, {**base, "method": "llama_single", "world": 1, "threads": 2, "sp": 2}]


# Issue 14: the Llama-3-shaped toy (seqpar.bench.memory) within a per-rank budget, with and without the memory
# options, against DeepSpeed's ALST path; and one step at L = 8192 on one process (peak vs the full-logits path).
MEMORY_METHODS = ("llama3_seqpar", "llama3_seqpar_memory", "llama3_alst")


def longest_context(budget_bytes: int = 64 << 20, max_len: int = 1 << 15) -> list[dict]:
    # Peaks are the step's live tensor storages (TrackedPeak): on CPU, RSS keeps allocator caches and
    # page-granular arenas that swamp a 64 MiB budget (measured: the same probe 74-140 MiB run to run).
    # Doubling from 256, then bisection down to 256 tokens: the N = 2, 4 gaps to ALST are ~300 and ~1100 tokens
    # (tracked peaks 2-3 MiB apart), which a 1024-token grid cannot tell apart.
    search = {"start": 256, "max_len": max_len, "budget_bytes": budget_bytes, "refine": 5}
    base = {"batch": 1, "model": "llama3", "threads": 1, "search": search, "tracked": True}
    rows = [{**base, "method": "llama3_hf", "world": 1, "sp": 1}]  # plain HF has no SP: N = 1 only
    rows += [{**base, "method": m, "world": n, "sp": n} for m in MEMORY_METHODS for n in (1, 2, 4)]
    one = {"batch": 1, "model": "llama3", "threads": 1, "world": 1, "sp": 1, "seq_len": 8192, "tracked": True}
    return rows + [{**one, "method": m} for m in ("llama3_hf", *MEMORY_METHODS)]


def gpu(quick: bool) -> list[dict]:
    """seqpar's block-kernel backends vs PyTorch SDPA at bf16 on one GPU (TFLOP/s of forward + backward)."""
    import torch

    if not torch.cuda.is_available():
        return [{"method": "all", "skipped": "no CUDA", "sp": 1, "seq_len": 0}]
    from seqpar.kernels.softmax import flash_attn_available

    base = {**SHAPE, "head_dim": 128, "dtype": "bfloat16", "device": "cuda", "world": 1, "threads": 1, "sp": 1}
    methods = ["single_sdpa", "kernel_torch", "kernel_sdpa"] + (["kernel_flash_attn"] if flash_attn_available() else [])
    lengths = [1024, 2048] if quick else [2048, 4096, 8192, 16384, 32768]
    # Forward: 2 matmuls of 2 B H L^2 D flops; backward 2.5x forward; causal does half of it.
    flops = lambda L: 3.5 * 4 * base["batch"] * base["heads"] * L * L * base["head_dim"] * 0.5  # noqa: E731
    return [{**base, "method": m, "seq_len": L, "flops": flops(L)} for L in lengths for m in methods]


def hybrid(quick: bool) -> list[dict]:
    """The linear layers of hybrid models (``seqpar.bench.hybrid``): a Gated DeltaNet rule, a Kimi Delta
    Attention rule, a Mamba2 scan and a Lightning Attention layer, LASP-2 (against the head all-to-all approach
    for GDN and Lightning), each against one process with N threads; and one training step of a whole tiny
    Qwen3-Next (``seqpar.bench.training``)."""
    base = {"batch": 1, "heads": 8, "head_dim": 64, "dtype": "float32"}
    if quick:
        return (_grid({2: ["gdn_lasp2", "gdn_a2a"]}, [128], {**base, "model": "gdn"}, "gdn_single")
                + _grid({2: ["kda_lasp2"]}, [128], {**base, "model": "kda"}, "kda_single")
                + _grid({2: ["ssd_lasp2"]}, [128], {**base, "model": "ssd", "d_state": 64}, "ssd_single")
                + _grid({2: ["lightning_lasp2"]}, [128], {**base, "model": "lightning"}, "lightning_single")
                + _grid({2: ["qwen3next_lasp2"]}, [128], {"batch": 1, "model": "qwen3next"}, "qwen3next_single"))
    lengths = [8192, 16384, 32768, 65536]
    return (_grid({2: ["gdn_lasp2", "gdn_a2a"], 4: ["gdn_lasp2", "gdn_a2a"]}, lengths, {**base, "model": "gdn"},
                  "gdn_single")
            + _grid({2: ["kda_lasp2"], 4: ["kda_lasp2"]}, lengths, {**base, "model": "kda"}, "kda_single")
            + _grid({2: ["ssd_lasp2"], 4: ["ssd_lasp2"]}, lengths, {**base, "model": "ssd", "d_state": 64},
                    "ssd_single")
            + _grid({2: ["lightning_lasp2", "lightning_a2a"], 4: ["lightning_lasp2", "lightning_a2a"]}, lengths,
                    {**base, "model": "lightning", "decay": 0.99}, "lightning_single")
            # one training step of a whole tiny Qwen3-Next (seqpar.bench.training.QWEN3_NEXT)
            + _grid({2: ["qwen3next_lasp2"]}, [8192, 16384], {"batch": 1, "model": "qwen3next"},
                    "qwen3next_single"))


# Issue 28: each primitive's own memory per rank, fwd + bwd, in units of the local q ([1, L/N, H, D]).
MEMORY_PRIMITIVES = ("ring_zigzag", "ring_contiguous", "allgather", "ulysses", "usp", "s2", "sf")


def memory(quick: bool) -> list[dict]:
    """Peak memory per rank of every softmax primitive at L = 16k, N = 1, 2, 4, 8 (8 one-thread ranks fit a
    2-core machine for memory; their times are not the point), with the one-process baseline of each N; the
    report adds ``units``: the peak above the inputs (q, k, v, dO) in units of the local q, issue 28's measure.
    Ranks run with glibc returning freed blocks at once (``measure.GLIBC_RETURNS_FREED``) and the peak is
    taken over the calls after the warm-up, so it is the live memory of a call, as issue 28's probe measured
    it, without one-time costs."""
    base = {**SHAPE, "group_size_ratio": 0.25, "live_peak": True}
    lengths, worlds = ([128], (2,)) if quick else ([16384], (1, 2, 4, 8))
    methods = ("ring_zigzag", "s2") if quick else MEMORY_PRIMITIVES
    rows = []
    for L in lengths:
        for n in worlds:
            rows.append({**base, "seq_len": L, "method": "single_sdpa", "world": 1, "threads": n, "sp": n})
            # USP needs 2 x N/2 ranks; S2/SF groups of L/4 tokens must fit in a rank's L/N (N <= 4)
            rows += [{**base, "seq_len": L, "method": m, "world": n, "threads": 1, "sp": n}
                     for m in methods if not (m == "usp" and n < 4)
                     and not (m in ("s2", "sf") and n * base["group_size_ratio"] > 1)]
    return rows


SUITES = {"softmax": softmax, "linear": linear, "longlora": longlora, "e2e": e2e, "scaling": scaling, "gpu": gpu,
          "hybrid": hybrid, "memory": memory}
