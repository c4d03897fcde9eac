"""Fake-CUDA worker of tests/test_cuda_paths.py: seqpar's CUDA code paths on fake tensors, one process.

Run in a child started with ``seqpar.fake_cuda.environ()`` (the shim that gives a CPU-only PyTorch a CUDA
device guard and CUDA hooks). Every case runs under one ``FakeTensorMode`` on ``device="cuda"``, inside a
fake process group of W ranks seen as one rank (``seqpar.fake_cuda.fake_group``) where the case is
distributed. Under fake tensors a data-dependent read (``.item()``, ``.tolist()``, ``bool(t)``) raises
``DataDependentOutputException``: a case that completes performed none besides the declared ones
(``seqpar.kernels.host``), whose counts it reports. A read of the fake ``cu_seqlens``, gathered shapes or
flags takes the declared stand-in value (every rank has this rank's shapes).

    python tests/cuda_paths_worker.py OUT.json   # prints nothing; writes one record per case

Each record: ``{"case", "ok", "error", "reads", "info"}``; the test asserts on them.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import traceback
import types
from collections import Counter

import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from seqpar import fake_cuda
from seqpar.kernels import host

WORLDS = (1, 2, 4, 8)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CUDA = torch.device("cuda", 0)
RECORDS: list[dict] = []


def views(world: int) -> list[int]:
    """The ranks whose view is simulated: first, middle, last (distinct)."""
    return sorted({0, world // 2, world - 1})


class OpLog(TorchDispatchMode):
    """Every aten op that runs (under the fake mode), by name, and every device-to-host copy."""

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()
        self.to_host = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops[func.overloadpacket.__name__] += 1
        out = func(*args, **kwargs)
        src = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if isinstance(out, torch.Tensor) and src is not None and src.is_cuda and out.device.type == "cpu":
            self.to_host += 1
        if func.overloadpacket.__name__ == "copy_" and args[0].device.type == "cpu" and args[1].is_cuda:
            self.to_host += 1
        return out


def case(name: str, fn, *args, **kwargs) -> dict:
    """Run one case; record whether it completed, the declared host reads it made and what it returns."""
    host.read_counts(reset=True)
    record = {"case": name, "ok": False, "error": None, "reads": {}, "info": {}}
    start = time.perf_counter()
    try:
        info = fn(*args, **kwargs)
        record.update(ok=True, info=info or {})
    except DataDependentOutputException as e:
        record["error"] = f"data-dependent read: {e} at {_where(e)}"
    except Exception as e:  # the test shows it
        record["error"] = f"{type(e).__name__}: {e} at {_where(e)}"
    record["reads"] = host.read_counts(reset=True)
    record["seconds"] = round(time.perf_counter() - start, 2)
    if record["error"]:
        record["error"] = record["error"][:400]
    RECORDS.append(record)
    return record


def _where(e: BaseException) -> str:
    """The innermost seqpar frame of the exception (where a read happened)."""
    frames = [f for f in traceback.extract_tb(e.__traceback__) if "/seqpar/" in f.filename or "tests/" in f.filename]
    f = frames[-1] if frames else traceback.extract_tb(e.__traceback__)[-1]
    return f"{f.filename.split('/work/main/')[-1]}:{f.lineno} ({f.name})"


def meta(t: torch.Tensor) -> list:
    return [list(t.shape), str(t.dtype).removeprefix("torch."), str(t.device)]


# ---------------------------------------------------------------------------------------------- kernels


def kernel_case(dtype: torch.dtype, backend: str, *, gqa: bool, causal, plan: str | None, head_dim: int = 64):
    """block_attention forward and its hand-written backward on fake CUDA; the ops and K/V repeats seen."""
    from seqpar.kernels import softmax
    from seqpar.kernels.softmax import block_attention, block_attention_backward

    B, L, H = 2, 256, 4
    Hkv = 2 if gqa else H
    q = torch.randn(B, L, H, head_dim, device=CUDA, dtype=dtype)
    k = torch.randn(B, L, Hkv, head_dim, device=CUDA, dtype=dtype)
    v = torch.randn_like(k)
    masks = {"causal": causal}
    if plan == "docs":  # packed documents: a host-side plan of several fused pieces
        masks["cu_seqlens"] = [0, 40, 100, 256]
    elif plan == "tensor":  # explicit position tensors: the tiled kernel only
        masks["q_pos"] = masks["k_pos"] = torch.arange(L, device=CUDA)
    repeats = []
    expand = softmax._expand_kv
    softmax._expand_kv = lambda x, g: (repeats.append(g) if g > 1 else None, expand(x, g))[1]
    softmax.reset_fallbacks()
    try:
        with OpLog() as log:
            out, lse = block_attention(q, k, v, backend=backend, **masks)
            dq, dk, dv = block_attention_backward(torch.randn_like(q), q, k, v, out.to(dtype), lse, backend=backend,
                                                  **masks)
    finally:
        softmax._expand_kv = expand
    acc = "float32"
    expect = {"out": [[B, L, H, head_dim], acc, "cuda:0"], "lse": [[B, H, L], acc, "cuda:0"],
              "dq": [[B, L, H, head_dim], acc, "cuda:0"], "dk": [[B, L, Hkv, head_dim], acc, "cuda:0"],
              "dv": [[B, L, Hkv, head_dim], acc, "cuda:0"]}
    got = {"out": meta(out), "lse": meta(lse), "dq": meta(dq), "dk": meta(dk), "dv": meta(dv)}
    if got != expect:
        raise AssertionError(f"shapes/dtypes/devices {got} != {expect}")
    fused = sorted(n for n in log.ops if "scaled_dot_product" in n or "flash_attn" in n)
    return {"fused_ops": fused, "repeats": repeats, "fallbacks": softmax.fallback_counts(),
            "to_host": log.to_host}


def fake_flash_attn() -> types.ModuleType:
    """A stand-in ``flash_attn`` module with flash-attn's documented output layouts (its own fake
    registrations: out like q, lse [B, H, Lq] / [H, total_q] float32); shapes only, as under fake tensors."""
    mod = types.ModuleType("flash_attn")
    mod.calls = Counter()

    def flash_attn_func(q, k, v, softmax_scale=None, causal=False, return_attn_probs=False):
        mod.calls["flash_attn_func"] += 1
        lse = torch.empty(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32, device=q.device)
        return torch.empty_like(q), lse, None

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale=None,
                               causal=False, return_attn_probs=False):
        mod.calls["flash_attn_varlen_func"] += 1
        assert cu_seqlens_q.dtype == torch.int32 and cu_seqlens_q.device == q.device and k.dim() == 3
        lse = torch.empty(q.shape[1], q.shape[0], dtype=torch.float32, device=q.device)
        return torch.empty_like(q), lse, None

    mod.flash_attn_func, mod.flash_attn_varlen_func = flash_attn_func, flash_attn_varlen_func
    return mod


@contextlib.contextmanager
def flash_attn_installed():
    """seqpar sees flash-attn installed on an Ampere GPU (the stand-in module)."""
    from seqpar.kernels import softmax

    mod = fake_flash_attn()
    saved = softmax._flash_attn_module, softmax.flash_attn_available
    softmax._flash_attn_module = lambda: mod
    softmax.flash_attn_available = lambda device=None: True
    try:
        yield mod
    finally:
        softmax._flash_attn_module, softmax.flash_attn_available = saved


def flash_attn_case(dtype, plan: str | None):
    with flash_attn_installed() as mod:
        info = kernel_case(dtype, "auto", gqa=True, causal=True, plan=plan)
    return {**info, "calls": dict(mod.calls)}


def run_kernels() -> None:
    for dname, dtype in DTYPES.items():
        for gqa in (False, True):
            for causal in (False, True):
                case(f"kernel auto {dname} gqa={gqa} causal={causal}", kernel_case, dtype, "auto", gqa=gqa,
                     causal=causal, plan=None)
        case(f"kernel auto {dname} docs", kernel_case, dtype, "auto", gqa=True, causal=True, plan="docs")
        case(f"kernel auto {dname} rectangular", rect_case, dtype)
        case(f"kernel torch {dname} causal", kernel_case, dtype, "torch", gqa=True, causal=True, plan=None)
        case(f"kernel torch {dname} tensor-mask", kernel_case, dtype, "auto", gqa=True, causal=True, plan="tensor")
        case(f"kernel auto {dname} head_dim=12", kernel_case, dtype, "auto", gqa=True, causal=True, plan=None,
             head_dim=12)
    for dname in ("bf16", "fp16"):
        case(f"kernel flash_attn {dname}", flash_attn_case, DTYPES[dname], None)
        case(f"kernel flash_attn {dname} docs", flash_attn_case, DTYPES[dname], "docs")


def rect_case(dtype):
    """A rectangular causal block (bottom-right, e.g. a KV cache): a plan of a rectangle and a diagonal."""
    from seqpar.kernels import softmax
    from seqpar.kernels.softmax import block_attention, block_attention_backward

    q = torch.randn(1, 64, 4, 64, device=CUDA, dtype=dtype)
    k = torch.randn(1, 192, 2, 64, device=CUDA, dtype=dtype)
    softmax.reset_fallbacks()
    with OpLog() as log:
        out, lse = block_attention(q, k, k, causal="bottom_right")
        block_attention_backward(torch.randn_like(q), q, k, k, out.to(dtype), lse, causal="bottom_right")
    assert meta(out) == [[1, 64, 4, 64], "float32", "cuda:0"] and meta(lse) == [[1, 4, 64], "float32", "cuda:0"]
    return {"fused_ops": sorted(n for n in log.ops if "scaled_dot_product" in n),
            "fallbacks": softmax.fallback_counts(), "to_host": log.to_host}


# ---------------------------------------------------------------------------------------------- attentions

HEADS, KV_HEADS, HEAD_DIM, LOCAL = 8, 2, 16, 16  # Ulysses at W = 8 needs 8 heads; 16 tokens per rank


def tiny_config(**extra):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=128, hidden_size=HEADS * HEAD_DIM, intermediate_size=160, num_hidden_layers=2,
                       num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=4096,
                       attention_dropout=0.0, tie_word_embeddings=False, **extra)


def tiny_llama():
    from transformers import LlamaForCausalLM

    return build(LlamaForCausalLM, tiny_config())


def build(cls, config):
    """``cls(config)`` with bf16 parameters made on fake CUDA directly (no meta step, no copies)."""
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(CUDA):
            return cls(config)
    finally:
        torch.set_default_dtype(dtype)


def patch_options(name: str) -> dict:
    return {"group_size": 8} if name in ("s2", "sf") else {}


def attention_case(name: str, model, group, world: int):
    """The registry's call of ``name`` as the patched model makes it: validated (first layer), then not; both
    forward and backward through autograd. Reports the declared reads of each call."""
    from seqpar.attention.registry import get_spec
    from seqpar.models import patch_model
    from seqpar.models.patch import patch_of

    model = patch_model(model, name, group, **patch_options(name))
    patch = patch_of(model)
    spec = get_spec(name)
    reads = []
    for validate in (True, False):
        q = torch.randn(1, LOCAL, HEADS, HEAD_DIM, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(1, LOCAL, KV_HEADS, HEAD_DIM, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn_like(k, requires_grad=True)
        host.read_counts(reset=True)
        out = spec.call(patch, q, k, v, HEAD_DIM ** -0.5, None, validate=validate)
        out.float().sum().backward()
        reads.append(host.read_counts(reset=True))
        for t, like in ((out, q), (q.grad, q), (k.grad, k), (v.grad, v)):
            if meta(t) != meta(like):
                raise AssertionError(f"{meta(t)} != {meta(like)}")
    return {"reads_validated": reads[0], "reads_unvalidated": reads[1]}


def lasp2_case(group, world: int):
    """LASP-2 (the linear-attention primitive) forward and backward; a learned decay on the device too."""
    from seqpar.attention.lasp2 import lasp2_linear_attention

    q = torch.randn(1, LOCAL, 4, 16, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    k, v = torch.randn_like(q, requires_grad=True), torch.randn_like(q, requires_grad=True)
    decay = torch.full((4,), 0.9, device=CUDA, requires_grad=True)
    reads = []
    for d, validate in ((0.9, True), (decay, False)):
        host.read_counts(reset=True)
        out = lasp2_linear_attention(q, k, v, group=group, decay=d, validate=validate)
        out.float().sum().backward()
        reads.append(host.read_counts(reset=True))
        assert meta(out) == meta(q) and meta(k.grad) == meta(k)
    assert meta(decay.grad) == meta(decay)
    return {"reads_validated": reads[0], "reads_unvalidated": reads[1]}


# ---------------------------------------------------------------------------------------------- model


def batch(world: int, docs: bool):
    L = LOCAL * world
    b = {"input_ids": torch.randint(0, 128, (1, L), device=CUDA)}
    if docs:
        b["seq_lens"] = [L // 4, L // 2, L - L // 4 - L // 2]  # host ints: shard_batch reads nothing
    return b


def shard_case(group, world: int):
    """shard_batch on CUDA input ids: plain, packed documents (host ints), a right-padding mask."""
    from seqpar.models import shard_batch

    out = {}
    for layout in ("zigzag", "contiguous"):
        for docs in (False, True):
            sp = shard_batch(batch(world, docs), group, layout)
            assert all(t.is_cuda and t.shape[-1] == LOCAL for k, t in sp.items() if k != "cu_seqlens"), sp
            out[f"{layout} docs={docs}"] = {k: meta(t) for k, t in sp.items()}
    padded = {**batch(world, False), "attention_mask": torch.ones(1, LOCAL * world, device=CUDA, dtype=torch.long)}
    shard_batch(padded, group, "zigzag")
    return out


def train_case(name: str, model, group, world: int, steps: int = 1, docs: bool = False):
    """Patched tiny Llama, bf16: gradient checkpointing with offload, tiled MLP, fused loss; ``steps`` steps
    (forward, backward, SGD). Reports each step's declared reads and device-to-host copies."""
    from seqpar.attention.registry import get_spec
    from seqpar.models import causal_lm_loss, patch_model, patched_layout, shard_batch
    from seqpar.models.offload import enable_checkpoint_offload
    from seqpar.models.tiled_mlp import tile_mlp

    model = patch_model(model, name, group, **patch_options(name))
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    assert enable_checkpoint_offload(model, force=True)  # no real CUDA here: the CPU-copy path, same code
    tile_mlp(model, chunk_size=LOCAL // 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    docs = docs and get_spec(name).varlen
    per_step = []
    for _ in range(steps):
        host.read_counts(reset=True)
        with OpLog() as log:
            sp = shard_batch(batch(world, docs), group, patched_layout(model))
            labels = sp.pop("labels")
            loss = causal_lm_loss(model, sp, labels, group, chunk_size=LOCAL // 2)
            loss.backward()
            bad = [n for n, p in model.named_parameters() if p.grad is None or meta(p.grad) != meta(p)]
            assert not bad, f"parameters without a bf16 CUDA gradient: {bad}"
            opt.step()
            opt.zero_grad(set_to_none=True)
        assert meta(loss) == [[], "float32", "cuda:0"], meta(loss)
        per_step.append({"reads": host.read_counts(reset=True), "to_host": log.to_host})
    from seqpar.models import attention_calls

    return {"steps": per_step, "calls": attention_calls(model), "layers": model.config.num_hidden_layers,
            "packed": docs}


def linear_train_case(group, world: int):
    """Linear-Llama with LASP-2 (``patch_model(..., "lasp2")``): one bf16 step, fused loss."""
    from seqpar.models import causal_lm_loss, patch_model, shard_batch
    from seqpar.models.linear_llama import LinearLlamaConfig, LinearLlamaForCausalLM

    # the Llama config's fields, not its model_type (a "model_type" kwarg would make this config say "llama")
    fields = {k: v for k, v in tiny_config().to_dict().items() if k != "model_type"}
    model = patch_model(build(LinearLlamaForCausalLM, LinearLlamaConfig(**fields)), "lasp2", group)
    host.read_counts(reset=True)
    sp = shard_batch(batch(world, False), group, "contiguous")
    labels = sp.pop("labels")
    causal_lm_loss(model, sp, labels, group, chunk_size=LOCAL // 2).backward()
    return {"reads": host.read_counts(reset=True), "model_type": model.config.model_type}


# ---------------------------------------------------------------------------------------------- planted


def planted_case(group, world: int):
    """A ``.item()`` planted in the ring's per-step merge: the case must fail with a data-dependent read."""
    from seqpar.attention import ring
    from seqpar.kernels import merge

    real = ring.merge_into

    def merge_into(out, lse, o, l):
        lse.max().item()  # the planted host sync
        real(out, lse, o, l)

    ring.merge_into = merge_into
    try:
        q = torch.randn(1, LOCAL, 4, 16, device=CUDA, dtype=torch.bfloat16)
        ring.ring_attention(q, q, q, group=group, validate=False)
    finally:
        ring.merge_into = real
    del merge
    return {}


# ---------------------------------------------------------------------------------------------- main


def main(path: str) -> None:
    if not fake_cuda.active():
        raise SystemExit("cuda_paths_worker: start me with seqpar.fake_cuda.environ() (the fake-CUDA shim)")
    from seqpar.attention.registry import ATTENTIONS

    # The simulated device: an H100 (torch.distributed.broadcast asks a CUDA tensor's device for it; a
    # CPU-only build has no device properties to answer with).
    torch.cuda.get_device_capability = lambda device=None: (9, 0)
    softmax_names = [n for n, s in ATTENTIONS.items() if s.models == "softmax"]
    start = time.perf_counter()
    with FakeTensorMode(allow_non_fake_inputs=True):
        run_kernels()
        for world in WORLDS:
            trained = {1: 0, 2: 1, 4: 2, 8: 0}[world]  # the training step seen as the first, last, middle, first rank
            for rank in views(world):
                with fake_cuda.fake_group(rank, world) as group:
                    tag = f"W={world} rank={rank}"
                    model = tiny_llama()  # one model per view, re-patched for each attention
                    for name in softmax_names:
                        case(f"attention {name} {tag}", attention_case, name, model, group, world)
                    case(f"attention lasp2 {tag}", lasp2_case, group, world)
                    if rank != trained:
                        continue
                    case(f"shard_batch {tag}", shard_case, group, world)
                    for name in softmax_names:  # W = 2: two steps (the position check reads at the first only)
                        case(f"train {name} {tag}", train_case, name, model, group, world, steps=2 if world == 2 else 1,
                             docs=world in (4, 8))
                    case(f"train lasp2 {tag}", linear_train_case, group, world)
                    if world == 4:
                        case(f"planted read {tag}", planted_case, group, world)
    RECORDS.append({"case": "elapsed", "ok": True, "error": None, "reads": {},
                    "info": {"seconds": round(time.perf_counter() - start, 1)}})
    with open(path, "w") as f:
        json.dump(RECORDS, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
    # No interpreter teardown: the autograd engine's CUDA device thread (there under the shim, with no CUDA
    # runtime) can abort at exit ("terminate called without an active exception") after the records are written.
    sys.stdout.flush()
    os._exit(0)
