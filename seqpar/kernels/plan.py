"""Decompose, then fuse: a host-side plan that splits a masked attention block into pieces fused kernels
compute exactly.

Fused kernels (PyTorch's flash op on CPU and CUDA, flash-attn) compute two shapes exactly: a *full*
rectangle (no mask) and a *square causal diagonal* (query i sees keys j <= i). Every block a primitive
computes is a union of those, once the global positions of its rows and keys are known on the host as
contiguous runs (a zigzag shard is two runs, an all-gathered zigzag sequence 2N runs) and its documents as
Python-int boundaries (``cu_seqlens``):

    for every (query run, key run) pair and every document they share:
        keys all at or before every query  -> full rectangle
        keys all after every query         -> nothing
        overlapping                        -> full rectangle of the keys before the first query
                                              + square diagonal where positions coincide
                                              + full rectangle of the queries after the last key

Sliding windows (``window=w``, transformers' rule: query q sees key k iff ``q - w < k <= q``) cut each
(query run, key run, document) into chunks of at most ``min(w - 1, WINDOW_CHUNK)`` queries ``[a, b)``;
each chunk sees ``w - 1 + (b - a)`` keys in three zones:

    keys [a-w+1, b-w+1)  -> anti-diagonal square: row i sees keys j >= i (the window's far edge)
    keys [b-w+1, a)      -> full rectangle (seen by every row of the chunk)
    keys [a, b)          -> square causal diagonal

each clipped to the key run and the document (a clipped anti square is the mirror image of a clipped causal
square: ``_pair`` in negated coordinates). An anti square is the causal kernel on the square with its rows
and keys reversed (``kernels.softmax``). A chunk of ``WINDOW_CHUNK`` rows keeps the computed cells within
``(w - 1 + c) / w`` of the band's.

Pairs that share no document produce no piece (never computed and masked). The pieces' partial
``(out, lse)`` merge by log-sum-exp (``kernels/merge.py``); their gradients are exact partial sums when
computed from the merged ``(out, lse)`` (FlashAttention-2's backward). Everything here is Python ints: a
plan is built once per call from what the caller knows (layout, rank, world, document boundaries), never by
reading a device tensor, so it adds no host sync.

A piece is ``(q0, q1, k0, k1, kind)`` in LOCAL row/key indices of the block; ``kind`` is False (full
rectangle), True (causal diagonal: row i sees keys j <= i) or ``"anti"`` (row i sees keys j >= i); causal and
anti pieces are square.
"""

from __future__ import annotations

import bisect
import functools
from collections.abc import Sequence
from dataclasses import dataclass

Span = tuple[int, int]  # [start, stop) of global positions of a contiguous run, in local order
Piece = tuple[int, int, int, int, bool | str]  # kind: False full, True causal, "anti" anti-diagonal
ANTI = "anti"
WINDOW_CHUNK = 256  # rows per window chunk: (w - 1 + c) / w of the band's cells computed, 3 kernel calls per c rows


@dataclass(frozen=True)
class BlockPlan:
    """Pieces of one ``[Lq x Lk]`` block, in execution order; ``first[i]``: piece i's rows were not touched by
    an earlier piece (its result is stored, not merged)."""

    lq: int
    lk: int
    pieces: tuple[Piece, ...]
    first: tuple[bool, ...]

    @property
    def flops_fraction(self) -> float:
        """Fraction of the ``Lq x Lk`` score cells the pieces compute (causal and anti diagonals count half)."""
        cells = sum((q1 - q0) * (k1 - k0) * (0.5 if c else 1.0) for q0, q1, k0, k1, c in self.pieces)
        return cells / max(1, self.lq * self.lk)


def _finish(lq: int, lk: int, pieces: list[Piece]) -> BlockPlan:
    pieces = _coalesce(pieces)
    pieces.sort(key=lambda p: (p[0], p[2]))
    first, reach = [], 0
    for q0, q1, *_ in pieces:
        first.append(q0 >= reach)
        reach = max(reach, q1)
    return BlockPlan(lq, lk, tuple(pieces), tuple(first))


def _coalesce(pieces: list[Piece]) -> list[Piece]:
    """Join full rectangles that share their rows and have adjacent keys (or share keys, adjacent rows):
    fewer, larger kernel calls and merges."""
    full = sorted(p for p in pieces if not p[4])
    diag = [p for p in pieces if p[4]]
    joined: list[Piece] = []
    for p in full:  # same rows, adjacent keys
        if joined and joined[-1][:2] == p[:2] and joined[-1][3] == p[2]:
            joined[-1] = (p[0], p[1], joined[-1][2], p[3], False)
        else:
            joined.append(p)
    joined.sort(key=lambda p: (p[2], p[3], p[0]))
    out: list[Piece] = []
    for p in joined:  # same keys, adjacent rows
        if out and out[-1][2:4] == p[2:4] and out[-1][1] == p[0]:
            out[-1] = (out[-1][0], p[1], p[2], p[3], False)
        else:
            out.append(p)
    return out + diag


def _check_spans(spans: Sequence[Span], name: str) -> None:
    if any(b < a for a, b in spans):
        raise ValueError(f"{name}={list(spans)} must be [start, stop) runs (start <= stop) of global positions, "
                         "in local order")


def _pair(qa: int, qb: int, ka: int, kb: int, causal: bool) -> list[Piece]:
    """Pieces of query positions [qa, qb) against key positions [ka, kb), in GLOBAL positions."""
    if not causal or kb - 1 <= qa:
        return [(qa, qb, ka, kb, False)]
    if ka > qb - 1:
        return []
    out = []
    if ka < qa:  # keys before the first query: seen by every query
        out.append((qa, qb, ka, qa, False))
    s, e = max(ka, qa), min(kb, qb)
    out.append((s, e, s, e, True))  # positions coincide: the square causal diagonal
    if kb < qb:  # queries after the last key see all of [s, kb)
        out.append((kb, qb, s, kb, False))
    return out


def _window_pair(qa: int, qb: int, ka: int, kb: int, w: int) -> list[Piece]:
    """Pieces of queries [qa, qb) against keys [ka, kb) (GLOBAL positions) under ``q - w < k <= q``."""
    if qb - 1 - ka < w:  # every visible key is inside every row's window: plain causal
        return _pair(qa, qb, ka, kb, True)
    lo, hi = max(qa, ka), min(qb, kb - 1 + w)  # rows that see at least one key
    if w == 1:  # each row sees itself only
        return [(q, q + 1, q, q + 1, True) for q in range(lo, hi) if ka <= q < kb]
    out: list[Piece] = []
    c = min(w - 1, WINDOW_CHUNK)
    for a in range(lo, hi, c):
        b = min(a + c, hi)
        # far edge, keys [a-w+1, b-w+1): k + w - 1 >= q is causal in negated coordinates (q' = -q,
        # k' = -(k + w - 1)); its pieces map back with causal squares becoming anti squares
        k0, k1 = max(a - w + 1, ka), min(b - w + 1, kb)
        if k0 < k1:
            for p0, p1, r0, r1, kind in _pair(1 - b, 1 - a, 2 - w - k1, 2 - w - k0, True):
                out.append((1 - p1, 1 - p0, 2 - w - r1, 2 - w - r0, ANTI if kind else False))
        k0, k1 = max(b - w + 1, ka), min(a, kb)  # seen by every row of the chunk
        if k0 < k1:
            out.append((a, b, k0, k1, False))
        k0, k1 = max(a, ka), min(b, kb)  # the causal diagonal
        if k0 < k1:
            out.extend(_pair(a, b, k0, k1, True))
    return out


def spans_plan(
    q_spans: Sequence[Span],
    k_spans: Sequence[Span],
    *,
    causal: bool,
    cu_seqlens: Sequence[int] | None = None,
    window: int | None = None,
) -> BlockPlan:
    """Plan of a block whose rows/keys have global positions given by contiguous runs (local order), causal
    meaning ``k_pos <= q_pos``, documents ``[cu[i], cu[i+1])`` kept apart (None: one document), and with
    ``window`` (causal only) also ``k_pos > q_pos - window`` (transformers' sliding window).

    Cached on its (hashable) arguments: every layer of a model forward reuses the same plans.
    """
    q_spans = tuple((int(a), int(b)) for a, b in q_spans)
    k_spans = tuple((int(a), int(b)) for a, b in k_spans)
    cu = None if cu_seqlens is None else tuple(int(c) for c in cu_seqlens)
    if window is not None and (not causal or int(window) < 1):
        raise ValueError(f"window={window} needs causal attention and at least 1 token (transformers' sliding "
                         "window: q - window < k <= q)")
    return _spans_plan(q_spans, k_spans, bool(causal), cu, None if window is None else int(window))


@functools.lru_cache(maxsize=256)
def _spans_plan(q_spans: tuple[Span, ...], k_spans: tuple[Span, ...], causal: bool,
                cu: tuple[int, ...] | None, window: int | None = None) -> BlockPlan:
    _check_spans(q_spans, "q_spans")
    _check_spans(k_spans, "k_spans")
    lq, lk = sum(b - a for a, b in q_spans), sum(b - a for a, b in k_spans)
    pieces: list[Piece] = []
    qoff = 0
    for qa, qb in q_spans:
        koff = 0
        for ka, kb in k_spans:
            if cu is None:
                docs = [(min(qa, ka), max(qb, kb))]
            else:
                i = max(0, bisect.bisect_right(cu, min(qa, ka)) - 1)
                docs = []  # the documents that meet the span of both runs
                while i + 1 < len(cu) and cu[i] < max(qb, kb):
                    docs.append((cu[i], cu[i + 1]))
                    i += 1
            for da, db in docs:
                a_q, b_q, a_k, b_k = max(qa, da), min(qb, db), max(ka, da), min(kb, db)
                if a_q >= b_q or a_k >= b_k:
                    continue  # this document misses one of the runs: no piece at all
                band = _pair(a_q, b_q, a_k, b_k, causal) if window is None else _window_pair(a_q, b_q, a_k, b_k, window)
                for p_qa, p_qb, p_ka, p_kb, c in band:
                    pieces.append((qoff + p_qa - qa, qoff + p_qb - qa, koff + p_ka - ka, koff + p_kb - ka, c))
            koff += kb - ka
        qoff += qb - qa
    return _finish(lq, lk, pieces)


def aligned_plan(lq: int, lk: int, causal: bool | str, window: int | None = None) -> BlockPlan:
    """Plan of a plain block: ``causal`` False, True/"top_left" (query i sees keys j <= i) or "bottom_right"
    (j <= i + Lk - Lq, decoding with a KV cache and halo tiles), with an optional sliding ``window``."""
    if not causal:
        if window is not None:
            raise ValueError(f"window={window} needs causal attention")
        return _finish(lq, lk, [(0, lq, 0, lk, False)] if lq and lk else [])
    shift = lk - lq if causal == "bottom_right" else 0  # negative: the first -shift rows see nothing
    return spans_plan([(shift, shift + lq)], [(0, lk)], causal=True, window=window)


def prefix_plan(lq: int, lk: int, rows: Sequence[tuple[int, int, int]]) -> BlockPlan:
    """Plan where rows ``[q0, q1)`` see the first ``m`` keys, for each ``(q0, q1, m)`` (SF-Attn's sinks:
    a query sees the sinks before its group); rows not listed see nothing."""
    pieces = [(q0, q1, 0, min(m, lk), False) for q0, q1, m in rows if q1 > q0 and m > 0]
    return _finish(lq, lk, pieces)


def cut_spans(spans: Sequence[Span], start: int, stop: int | None = None) -> list[Span]:
    """The runs of local rows ``[start, stop)`` of a block whose rows have the runs ``spans``."""
    out, off = [], 0
    stop = sum(b - a for a, b in spans) if stop is None else stop
    for a, b in spans:
        lo, hi = max(start, off), min(stop, off + b - a)
        if lo < hi:
            out.append((a + lo - off, a + hi - off))
        off += b - a
    return out
