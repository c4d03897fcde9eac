"""Conformance of every attention in the registry (``seqpar.attention.registry.ATTENTIONS``), driven by its specs.

For each entry, at W = 4, 2, 3 and 1 (ONE spawn of 4 ranks: W=4 on the world, W=2 on {0, 1} and {2, 3},
W=3 on {0, 1, 2} while rank 3 runs W=1 with group=None), every case the spec's ``options`` allow:

* exactness: out, dq, dk, dv vs the spec's float64 ``reference`` (seqpar/kernels/reference.py) of the
  rounded global inputs; float64 1e-12, float32 1e-5, bfloat16 2e-2 of the output scale (GQA, MHA with
  head_dim 80, non-contiguous inputs, every layout and option value the spec lists; inputs never modified,
  no block falls back to the tiled kernel; options that change the math, learned sinks and sliding windows,
  are checked to be engaged: the float64 reference without them differs by far more than the tolerance);
* bytes: ``ByteCounter``'s forward and backward bytes sent by each rank equal the spec's ``comm_bytes``
  formula (written next to the primitive, as its docstring states it), exactly;
* errors: a bad input on ONE rank (a longer shard, other document boundaries, another shift-group size) and
  an invalid option raise a ValueError naming it on EVERY rank (a hang fails the spawn), and the group still
  works afterwards;
* ``validate=False`` (where the primitive takes it) runs no cross-rank check collective.

The hybrid models' token mixers (``registry.MIXERS``) are checked the same way at the end of the file (exactness
with packed documents, bytes equal to the formula and the same at L and 2L).

Adding an entry to the registry adds it here; nothing in this file names a primitive.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from seqpar.attention.registry import ATTENTIONS, MIXERS, head_split_degree
from seqpar.comm import ByteCounter, group_size
from seqpar.kernels.reference import rel_err
from seqpar.sharding import shard
from tests.dist import run_ranks

F64, F32, BF16 = torch.float64, torch.float32, torch.bfloat16
# float64: only summation order differs; float32: 1e-5 of the output scale; bf16: 8-bit mantissas.
TOL = {F64: 1e-12, F32: 1e-5, BF16: 2e-2}
B, N_LOCAL, D, HKV = 2, 16, 16, 2  # batch, tokens per rank, head dim, kv heads (GQA unless heads == 2)

# A value for every option a spec may list (cu_seqlens: packed documents crossing shards, one empty).
DEFAULTS = {"causal": True, "softmax_scale": None, "validate": True, "group_size": 8, "wrap": False,
            "num_sink_tokens": 3, "decay": None, "block_size": 16, "cu_seqlens": None, "sinks": None,
            "window": None}
# (name, dtype, option overrides, input changes): a case runs where the spec takes every overridden option;
# the spec's default layout runs them all, its other layouts the first OTHER_LAYOUTS. Windows (transformers'
# sliding window, query p sees keys p - w < k <= p) of 5, 9 and 20 tokens cross one or two shards of N_LOCAL =
# 16 tokens; 20 covers the whole sequence at W = 1 (no effect, the window is dropped).
VARIANTS = [
    ("f64", F64, {}, {}),
    ("f64-noncausal", F64, {"causal": False}, {}),
    ("f64-docs", F64, {"cu_seqlens": "docs"}, {}),
    ("f64-docs-noncausal", F64, {"cu_seqlens": "docs", "causal": False}, {}),
    ("f64-window", F64, {"window": 5}, {}),
    ("f64-docs-window", F64, {"cu_seqlens": "docs", "window": 9}, {}),
    ("f64-window-sinks", F64, {"window": 20, "sinks": "heads"}, {}),
    ("f32-window", F32, {"window": 9}, {}),
    ("bf16-window", BF16, {"window": 9}, {}),
    ("f64-wrap", F64, {"wrap": True}, {}),
    ("f64-decay", F64, {"decay": 0.9}, {}),
    ("f64-sinks", F64, {"sinks": "heads"}, {}),  # learned sink logits (gpt-oss), N(0, 2) per head
    ("f32-docs-sinks", F32, {"cu_seqlens": "docs", "sinks": "heads"}, {}),
    ("f64-strided", F64, {}, {"strided": True}),
    ("f32-scale", F32, {"softmax_scale": 0.3}, {}),
    ("f32-d80-mha", F32, {}, {"D": 80, "Hkv": None}),
    ("bf16", BF16, {}, {}),
]
OTHER_LAYOUTS = 5  # the variants a spec's non-default layouts run (one window case among them)
# Invalid values of each option, and what the error must name.
BAD_OPTIONS = {"causal": ("yes", "causal='yes'"), "softmax_scale": (-1.0, "softmax_scale=-1.0"),
               "layout": ("striped", "layout='striped'"), "group_size": (5, "group_size=5"),
               "num_sink_tokens": (-1, "num_sink_tokens=-1"), "block_size": (0, "block_size=0"),
               "decay": (1.5, "decay=1.5"), "cu_seqlens": ("list", "integer tensor"),
               "sinks": ("three", "sinks=(3,)"), "window": (0, "window=0")}


def _cu(world: int) -> torch.Tensor:
    L = N_LOCAL * world
    return torch.tensor([0, 5, 5, L // 2 + 3, L - 2, L])


def _heads(name: str, sub: dict, group) -> int:
    """Query heads: 4, or a multiple of the degree the spec splits heads over (Ulysses)."""
    sizes = {"group": group_size(group), **{k: group_size(g) for k, g in sub.items()}}
    degree = head_split_degree(name, **sizes) or 1
    return 4 * degree // math.gcd(4, degree)


def cases(name: str, world: int) -> dict[str, tuple]:
    """``{case: (layout, dtype, options, input changes)}`` the spec ``name`` takes."""
    spec = ATTENTIONS[name]
    base = {k: v for k, v in DEFAULTS.items() if k in spec.options and v is not None}
    out = {}
    for layout in spec.layouts if "layout" in spec.options else spec.layouts[:1]:
        lay = {"layout": layout} if "layout" in spec.options else {}
        for case, dtype, over, inputs in VARIANTS if layout == spec.default_layout else VARIANTS[:OTHER_LAYOUTS]:
            if set(over) <= set(spec.options):
                opts = {**base, **lay, **over}
                if opts.get("cu_seqlens") == "docs":
                    opts["cu_seqlens"] = _cu(world)
                out[f"{layout}-{case}"] = (layout, dtype, opts, inputs)
    return out


# ----------------------------------------------------------------------------------------- rank side


def _inputs(H, Hkv, Dh, dtype, world, seed):
    g = torch.Generator().manual_seed(seed)
    L = N_LOCAL * world
    shapes = [(B, L, H, Dh), (B, L, Hkv, Dh), (B, L, Hkv, Dh), (B, L, H, Dh)]
    return [torch.randn(s, generator=g, dtype=F64).to(dtype) for s in shapes]


def _run_case(name, rank, world, group, sub, layout, dtype, opts, inputs, seed) -> dict:
    """Errors of out, dq, dk, dv vs the float64 reference, and (measured, formula) bytes of this rank."""
    spec = ATTENTIONS[name]
    H = _heads(name, sub, group)
    Hkv = H if inputs.get("Hkv", HKV) is None else HKV
    q, k, v, dout = _inputs(H, Hkv, inputs.get("D", D), dtype, world, seed)
    if "decay" in opts and opts["decay"] is not None:  # the primitive and the reference see one λ per head
        opts = {**opts, "decay": torch.full((H,), opts["decay"], dtype=F64)}
    sinks = ref_sinks = None
    if opts.get("sinks") == "heads":  # the same logits on every rank, as a replicated parameter is
        ref_sinks = (2 * torch.randn(H, generator=torch.Generator().manual_seed(seed + 1000), dtype=F64))
        sinks = ref_sinks.to(dtype, copy=True).requires_grad_()
        ref_sinks.requires_grad_()
        opts = {**opts, "sinks": sinks}
    mine = lambda t: shard(t, layout=layout, rank=rank, world_size=world)  # noqa: E731
    local = [mine(t).requires_grad_() for t in (q, k, v)]
    before = [t.detach().clone() for t in local]
    args = [t.transpose(1, 2).contiguous().transpose(1, 2) if inputs.get("strided") else t for t in local]
    kwargs = {**opts, **sub}
    with ByteCounter() as fwd:
        out = spec.load()(*args, group=group, **kwargs)
    with ByteCounter() as bwd:
        out.backward(mine(dout))
    assert all(torch.equal(t, b) for t, b in zip(local, before)), f"{name}: inputs were modified"
    got = [out, *(t.grad for t in local)]
    assert all(t.dtype == dtype and t.shape == x.shape for t, x in zip(got, [local[0], *local])), name
    ref_in = [t.to(F64, copy=True).requires_grad_() for t in (q, k, v)]
    ref_opts = {**opts, "sinks": ref_sinks} if sinks is not None else opts
    ref_out = spec.load("reference")(*ref_in, **ref_opts)
    ref_out.backward(dout.double())
    ref = [ref_out.detach(), *(t.grad for t in ref_in)]
    formula = spec.load("comm_bytes")(*local, group=group, **kwargs)
    errors = {w: rel_err(g, mine(r)) for w, g, r in zip(("out", "dq", "dk", "dv"), got, ref)}

    def without(**off) -> float:  # the float64 reference with options turned off, against the one with them
        return rel_err(spec.load("reference")(*(t.detach() for t in ref_in), **{**ref_opts, **off}), ref_out.detach())

    if sinks is not None:  # each rank's gradient covers its rows (heads): summed over the group, as the trainer does
        ds = sinks.grad.detach().clone()
        if group is not None:
            dist.all_reduce(ds, group=group)
        errors["dsinks"] = rel_err(ds, ref_sinks.grad)
        errors["engaged_sinks"] = without(sinks=None)  # see test_matches_float64_reference
    if opts.get("window") is not None:
        errors["engaged_window"] = without(window=None)
    return {"errors": errors, "bytes": ((fwd.sent, bwd.sent), tuple(formula))}


def _error_of(call) -> str:
    try:
        call()
    except ValueError as err:
        return str(err)
    return "no error raised"


def _bad_inputs(name, rank, world, group, sub) -> dict[str, tuple[str, str]]:
    """``{case: (message on this rank, what it must name)}``; each case is bad on one rank or on all."""
    spec = ATTENTIONS[name]
    layout, last = spec.default_layout, rank == world - 1
    base = {k: v for k, v in DEFAULTS.items() if k in spec.options and v is not None}
    base.update({"layout": layout} if "layout" in spec.options else {})

    def call(n=N_LOCAL, H=None, Hkv=HKV, **over):
        H = H or _heads(name, sub, group)
        q, k, v = (torch.randn(B, n, h, D) for h in (H, Hkv, Hkv))
        return lambda: spec.load()(q, k, v, group=group, **{**base, **sub, **over})

    bad = {}
    for option, (value, words) in BAD_OPTIONS.items():
        if option in spec.options:
            value = [0, N_LOCAL * world] if value == "list" else torch.zeros(3) if value == "three" else value
            bad[f"option-{option}"] = (_error_of(call(**{option: value})), words)
    bad["kv-heads"] = (_error_of(call(H=4, Hkv=3)), "divid")  # 3 kv heads for 4 query heads
    degree = head_split_degree(name, group=group_size(group), **{k: group_size(g) for k, g in sub.items()})
    if degree and degree > 1:  # Ulysses: heads that do not split over the degree
        bad["heads-split"] = (_error_of(call(H=degree + 1, Hkv=1)), f"heads={degree + 1} is not divisible")
    if world > 1:  # only the last rank is wrong: every rank must raise
        bad["one-rank-length"] = (_error_of(call(n=N_LOCAL + 8 * last)), "ranks of the SP group")
        if "cu_seqlens" in spec.options:
            cu = torch.tensor([0, 3 + last, N_LOCAL * world])
            bad["one-rank-cu_seqlens"] = (_error_of(call(cu_seqlens=cu)), "cu_seqlens differs across")
        if "group_size" in spec.options:
            bad["one-rank-group_size"] = (_error_of(call(group_size=4 if last else 8)), "group_size per rank")
    call()()  # the group still works after the errors
    return bad


def _validate_collectives(name, group, sub) -> dict[bool, int]:
    """Cross-rank check collectives (``checks._gather_ints``) of one call with validate=True and False."""
    import seqpar.attention.checks as checks

    spec, counted, real = ATTENTIONS[name], [], checks._gather_ints
    if "validate" not in spec.options:
        return {}
    H = _heads(name, sub, group)
    q, k, v = (torch.randn(B, N_LOCAL, h, D) for h in (H, HKV, HKV))
    base = {k: v for k, v in DEFAULTS.items() if k in spec.options and v is not None}
    found = {}
    checks._gather_ints = lambda *a, **kw: counted.append(1) or real(*a, **kw)
    try:
        for validate in (True, False):
            counted.clear()
            spec.load()(q, k, v, group=group, **{**base, **sub, "validate": validate})
            found[validate] = len(counted)
    finally:
        checks._gather_ints = real
    return found


def _subgroups_made_once(name, group, sub) -> bool | None:
    """Asking the spec's ``make_subgroups`` again returns the same groups and creates none."""
    spec = ATTENTIONS[name]
    if not spec.make_subgroups:
        return None
    made, real = [], dist.new_group
    dist.new_group = lambda *a, **kw: made.append(1) or real(*a, **kw)
    try:
        again = spec.load("make_subgroups")(group, HKV)
    finally:
        dist.new_group = real
    return not made and all(again[k] is sub[k] for k in sub)


def conformance(rank, world, group, names, setup_group=None) -> dict:
    """Every check of every spec in ``names`` at this world size; ``setup_group``: the group this rank
    joins the world-collective creation of sub-groups with while it runs group=None (rank 3 at W=1)."""
    from seqpar.kernels import fallback_counts, reset_fallbacks

    reset_fallbacks()
    out = {}
    for name in names:
        spec = ATTENTIONS[name]
        sub = {}
        if spec.make_subgroups:
            if setup_group is not None:
                spec.load("make_subgroups")(setup_group, HKV)  # collective over the world: take part
            sub = spec.load("make_subgroups")(group, HKV) if group is not None else {}
        out[name] = {
            "cases": {c: _run_case(name, rank, world, group, sub, *args, seed=i)
                      for i, (c, args) in enumerate(cases(name, world).items())},
            "bad": _bad_inputs(name, rank, world, group, sub),
            "validate": _validate_collectives(name, group, sub) if world > 1 else {},
            "subgroups_once": _subgroups_made_once(name, group, sub) if world > 1 else None,
        }
    return {"specs": out, "fallbacks": fallback_counts()}


def _all_worlds(rank, world, group, names, run=conformance) -> dict:
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group, in order
    trio, solo = dist.new_group([0, 1, 2]), dist.new_group([3])
    found = {4: run(rank, 4, group, names), 2: run(rank % 2, 2, pairs[rank // 2], names)}
    if rank < 3:
        found[3] = run(rank, 3, trio, names)
    else:
        found[1] = run(0, 1, None, names, setup_group=solo)
    return found


# ----------------------------------------------------------------------------------------- pytest side

NAMES = tuple(ATTENTIONS)


@pytest.fixture(scope="module")
def worlds() -> dict[int, list[dict]]:
    per_rank = run_ranks(_all_worlds, 4, args=(NAMES,), timeout=400)
    found = {w: [r[w] for r in per_rank if w in r] for w in (1, 2, 3, 4)}
    assert {w: len(r) for w, r in found.items()} == {1: 1, 2: 4, 3: 3, 4: 4}
    return found


def _per_world(worlds, name):
    for world, results in worlds.items():
        yield world, [r["specs"][name] for r in results]


def engaged(dtype) -> float:
    """How far the float64 reference without an option (sinks, window) must be from the one with it, so that a
    primitive ignoring the option fails: 100x the tolerance; bfloat16's 100x (2.0) is beyond an output's
    scale, so 10x."""
    return (10 if dtype == BF16 else 100) * TOL[dtype]


@pytest.mark.parametrize("name", NAMES)
def test_matches_float64_reference(worlds, name):
    for world, results in _per_world(worlds, name):
        assert results[0]["cases"], (name, world)
        for case, (_, dtype, opts, _) in cases(name, world).items():
            errors = results[0]["cases"][case]["errors"]
            worst = {w: max(r["cases"][case]["errors"][w] for r in results) for w in errors
                     if not w.startswith("engaged")}
            assert max(worst.values()) <= TOL[dtype], (name, world, case, worst)
            if "sinks" in case:
                assert "dsinks" in worst and errors["engaged_sinks"] > engaged(dtype), (name, world, case, errors)
            if "window" in case:
                assert (errors["engaged_window"] > engaged(dtype)) == _window_cuts(opts, world), (name, world, case)


def _window_cuts(opts: dict, world: int) -> bool:
    """Whether the case's window is shorter than its longest document (else it changes nothing: a window of 20
    at W = 1, or of 9 over the documents of ``_cu(1)``)."""
    cu = opts.get("cu_seqlens")
    longest = N_LOCAL * world if cu is None else int(torch.diff(cu).max())
    return opts["window"] < longest


@pytest.mark.parametrize("name", NAMES)
def test_bytes_match_the_formula(worlds, name):
    for world, results in _per_world(worlds, name):
        for rank, r in enumerate(results):
            for case, c in r["cases"].items():
                measured, formula = c["bytes"]
                assert measured == formula, (name, world, rank, case, measured, formula)
        moved = sum(sum(c["bytes"][0]) for r in results for c in r["cases"].values())
        assert (moved > 0) == (world > 1), (name, world, moved)  # the formula is not vacuously 0


@pytest.mark.parametrize("name", NAMES)
def test_bad_inputs_raise_on_every_rank(worlds, name):
    for world, results in _per_world(worlds, name):
        for rank, r in enumerate(results):
            assert set(r["bad"]) == set(results[0]["bad"])
            for case, (msg, words) in r["bad"].items():
                assert words in msg, (name, world, rank, case, msg)
        assert any(c.startswith("one-rank") for c in results[0]["bad"]) == (world > 1)
        assert any(c.startswith("option-") for c in results[0]["bad"]), name


@pytest.mark.parametrize("name", NAMES)
def test_validate_false_skips_the_cross_rank_check(worlds, name):
    if "validate" not in ATTENTIONS[name].options:
        pytest.skip(f"{name} takes no validate argument (it always checks)")
    for world, results in _per_world(worlds, name):
        if world > 1:
            for r in results:
                assert r["validate"][True] >= 1 and r["validate"][False] == 0, (name, world, r["validate"])


@pytest.mark.parametrize("name", [n for n in NAMES if ATTENTIONS[n].make_subgroups])
def test_subgroups_are_made_once(worlds, name):
    for world, results in _per_world(worlds, name):
        if world > 1:
            assert all(r["subgroups_once"] for r in results), (name, world)


def test_no_tiled_kernel_fallback(worlds):
    """Every block of every case ran a fused kernel."""
    for world, results in worlds.items():
        assert all(r["fallbacks"] == {} for r in results), (world, [r["fallbacks"] for r in results])


@pytest.mark.parametrize("name", NAMES)
def test_every_entry_states_what_conformance_needs(name):
    """A registry entry names its options, its float64 reference and its bytes formula (all importable)."""
    spec = ATTENTIONS[name]
    assert spec.options and spec.comm_bytes and spec.reference, name
    for field in ("primitive", "reference", "comm_bytes", *(("make_subgroups",) if spec.make_subgroups else ())):
        assert callable(spec.load(field)), (name, field)
    assert set(spec.options) <= set(DEFAULTS) | {"layout"}, f"{name}: give the new option a value in DEFAULTS"


def test_a_registered_primitive_is_picked_up(monkeypatch):
    """A new registry entry is tested without touching this file, and its bytes formula is really checked:
    a fake entry (ring attention under another name) passes at W=1; one with a wrong formula fails."""
    import dataclasses

    ring = ATTENTIONS["ring"]
    fake = dataclasses.replace(ring, name="fake", options=("causal", "softmax_scale", "layout", "validate"))
    wrong = dataclasses.replace(fake, name="wrong", comm_bytes="tests.test_conformance:_one_byte")
    monkeypatch.setitem(ATTENTIONS, "fake", fake)
    monkeypatch.setitem(ATTENTIONS, "wrong", wrong)
    found = conformance(0, 1, None, ("fake", "wrong"))["specs"]
    assert set(found["fake"]["cases"]) == set(cases("fake", 1)) and len(found["fake"]["cases"]) >= 5
    for case, (_, dtype, _, _) in cases("fake", 1).items():
        c = found["fake"]["cases"][case]
        assert max(c["errors"].values()) <= TOL[dtype] and c["bytes"][0] == c["bytes"][1] == (0, 0), case
    assert all(c["bytes"][0] != c["bytes"][1] for c in found["wrong"]["cases"].values())


def _one_byte(*args, **kwargs) -> tuple[int, int]:
    return 1, 1


# ----------------------------------------------------------------------------------------- token mixers
# The hybrid models' token mixers (``registry.MIXERS``: the gated and Kimi delta rules, the short conv, the
# selective scan), at W = 4, 2, 3, 1
# in one spawn: output and the gradient of every input (parameters summed over the group) vs the float64
# reference of the rounded inputs, with packed documents, in each layout the entry lists (zigzag: two pieces
# of N_LOCAL/2 tokens per rank); bytes equal the formula and do not grow with L.

# (case, dtype, packed documents, length multiple, layout); bfloat16 inputs, float32 states: 8-bit mantissas
MIXER_CASES = (("f64", F64, False, 1, "contiguous"), ("f64-docs", F64, True, 1, "contiguous"),
               ("f64-2L", F64, False, 2, "contiguous"), ("f32", F32, False, 1, "contiguous"),
               ("bf16", BF16, False, 1, "contiguous"), ("f64-zigzag", F64, False, 1, "zigzag"),
               ("f64-docs-zigzag", F64, True, 1, "zigzag"), ("f64-2L-zigzag", F64, False, 2, "zigzag"))


def _mixer_case(name, world, group, dtype, docs, scale, seed, layout) -> dict:
    spec = MIXERS[name]
    L = N_LOCAL * world * scale
    tensors, dims, kwargs, out_dim = spec.load("example")(L, dtype, torch.Generator().manual_seed(seed))
    # zigzag: a document also starts exactly at a chunk edge (N_LOCAL/2: chunk 1 at any W), so a piece begins
    # with a document start (M = 0, halo masked)
    cu = None if not docs else _cu(world) if layout == "contiguous" else \
        torch.tensor(sorted([*_cu(world).tolist(), N_LOCAL // 2]))
    if layout != "contiguous":
        kwargs = {**kwargs, "layout": layout}
    mine = lambda t, d: t if d is None else shard(t, group=group, dim=d, layout=layout)  # noqa: E731
    local = [mine(t, d).detach().clone().requires_grad_() for t, d in zip(tensors, dims)]
    with ByteCounter() as fwd:
        out = spec.load()(*local, group=group, cu_seqlens=cu, **kwargs)
    shape = list(out.shape)
    shape[out_dim] *= group_size(group)
    dout = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1), dtype=F64)
    with ByteCounter() as bwd:
        out.backward(mine(dout, out_dim).to(dtype))
    ref_in = [t.to(F64, copy=True).requires_grad_() for t in tensors]
    ref = spec.load("reference")(*ref_in, cu_seqlens=cu, **{k: v for k, v in kwargs.items() if k != "layout"})
    ref.backward(dout)
    errors = {"out": rel_err(out, mine(ref.detach(), out_dim))}
    for i, (t, r, d) in enumerate(zip(local, ref_in, dims)):
        grad = t.grad.detach().clone()
        if d is None and group is not None:  # a replicated parameter: each rank holds its tokens' share
            dist.all_reduce(grad, group=group)
        errors[f"d{i}"] = rel_err(grad, mine(r.grad, d))
    formula = spec.load("comm_bytes")(*local, group=group, **kwargs)
    return {"errors": errors, "bytes": ((fwd.sent, bwd.sent), tuple(formula))}


def mixer_conformance(rank, world, group, names, setup_group=None) -> dict:
    return {name: {case: _mixer_case(name, world, group, dtype, docs, scale, i, layout)
                   for i, (case, dtype, docs, scale, layout) in enumerate(MIXER_CASES)
                   if layout in MIXERS[name].layouts} for name in names}


@pytest.fixture(scope="module")
def mixer_worlds() -> dict[int, list[dict]]:
    per_rank = run_ranks(_all_worlds, 4, args=(tuple(MIXERS), mixer_conformance), timeout=400)
    return {w: [r[w] for r in per_rank if w in r] for w in (1, 2, 3, 4)}


@pytest.mark.parametrize("name", tuple(MIXERS))
def test_mixers_match_float64_reference_and_bytes(mixer_worlds, name):
    tol = {case: TOL[dtype] for case, dtype, *_ in MIXER_CASES}
    for world, results in mixer_worlds.items():
        for r in results:
            for case, found in r[name].items():
                worst = max(found["errors"].values())
                assert worst <= tol[case], (name, world, case, found["errors"])
                assert found["bytes"][0] == found["bytes"][1], (name, world, case, found["bytes"])
            # the maps and the halo do not grow with the sequence: the same bytes at L and 2L
            for plain, longer in (("f64", "f64-2L"), ("f64-zigzag", "f64-2L-zigzag")):
                if plain in r[name]:
                    assert r[name][plain]["bytes"] == r[name][longer]["bytes"], (name, world, plain)
                    assert (sum(r[name][plain]["bytes"][0]) > 0) == (world > 1), (name, world)  # engaged
        assert ("f64-zigzag" in results[0][name]) == ("zigzag" in MIXERS[name].layouts), name
