"""Benchmark suites: which configurations run side by side, at full and at ``--quick`` sizes.

Every SP configuration uses N processes with one thread each; its baseline is one process with N threads on
the whole sequence, so both sides use the same number of threads.
"""

from __future__ import annotations

SHAPE = {"batch": 1, "heads": 8, "kv_heads": 8, "head_dim": 64, "dtype": "float32", "causal": True}


def _grid(methods_by_world: dict[int, list[str]], lengths: list[int], base: dict, baseline: str) -> list[dict]:
    configs = []
    for L in lengths:
        for world, methods in methods_by_world.items():
            configs.append({**base, "seq_len": L, "method": baseline, "world": 1, "threads": world, "sp": world})
            for m in methods:
                configs.append({**base, "seq_len": L, "method": m, "world": world, "threads": 1, "sp": world})
    return configs


def softmax(quick: bool) -> list[dict]:
    lengths = [256, 512] if quick else [2048, 4096, 8192, 16384]
    peers = ["deepspeed_ulysses", "torch_ring"]
    ours = ["ring_zigzag", "ring_contiguous", "rsa", "ulysses", "allgather"]
    configs = _grid({2: ours + peers, 4: [*ours, "usp", *peers]}, lengths, SHAPE, "single_sdpa")
    # Ring Self-Attention holds (L/N) x L scores per head: past 8k it is the paper's memory wall, not a benchmark.
    return [c for c in configs if not (c["method"] == "rsa" and c["seq_len"] > 8192)]


def linear(quick: bool) -> list[dict]:
    lengths = [256, 1024] if quick else [4096, 16384, 65536]
    base = {**SHAPE, "decay": 0.99}
    return _grid({2: ["lasp2", "lasp1", "ring_contiguous"], 4: ["lasp2", "lasp1", "ring_contiguous"]},
                 lengths, base, "single_sdpa")


def longlora(quick: bool) -> list[dict]:
    lengths = [256, 512] if quick else [4096, 8192, 16384]
    base = {**SHAPE, "group_size_ratio": 0.25}
    single = [{**base, "seq_len": L, "method": m, "world": 1, "threads": 1, "sp": 1}
              for L in lengths for m in ("single_sdpa", "s2", "sf")]
    return single + [c for c in _grid({2: ["s2", "sf"]}, lengths, base, "single_sdpa") if c["world"] > 1]


SUITES = {"softmax": softmax, "linear": linear, "longlora": longlora}
