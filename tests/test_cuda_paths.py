"""seqpar's CUDA code paths, run without a GPU: fake CUDA tensors and a fake process group (issue 26).

One child process (``tests/cuda_paths_worker.py``, started with ``seqpar.fake_cuda.environ()``) runs every case
under ``FakeTensorMode`` on ``device="cuda"`` and writes one record per case; the tests below assert on the
records. What a record proves: the code ran on CUDA tensors end to end (shapes, dtypes, devices, op schemas of
the fused kernels, forward and autograd backward), and it read no tensor value on the host except through a
declared site of ``seqpar.kernels.host`` (any other read raises ``DataDependentOutputException`` under fake
tensors), whose counts are asserted per forward and per step. docs/gpu.md explains the set-up.

What cannot run under fake tensors, and why (each is left to tests/gpu and scripts/gpu-check.sh on a GPU):
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from seqpar import fake_cuda

UNEXECUTED = {
    "values": "fake tensors have shapes, dtypes and devices but no values: the numerics of the CUDA kernels "
              "(flash, memory-efficient, flash-attn) and of every primitive on CUDA are tests/gpu's",
    "efficient-attention lse layout": "that the CUDA memory-efficient backward takes the lse padded to 32 rows "
                                      "as its forward returns it is an assumption from PyTorch's meta function",
    "flash-attn": "the package cannot be installed here: a stand-in module with its documented layouts runs "
                  "instead (shapes here; values against a reference of its documented semantics in "
                  "tests/test_kernels.py), including rows or keys of zero length in one varlen call",
    "cross-rank data": "a fake group moves no data: each rank's view runs alone, and a declared gather (the "
                       "shape check, the position flag, USP's sub-group members) takes this rank's value",
    "NCCL and real CUDA tensors": "a CPU-only PyTorch has no CUDA runtime: no streams, events, pinned memory "
                                  "or device properties (the worker names the device an H100 for "
                                  "torch.distributed, which asks a CUDA tensor's capability)",
    "pinned checkpoint offload": "pin_memory needs the CUDA runtime: offload runs its unpinned copy path "
                                 "(enable_checkpoint_offload(force=True)); the copies to the host are counted",
    "a cu_seqlens tensor on CUDA": "its boundaries are read once per batch (declared site 'cu_seqlens'), and a "
                                   "fake tensor has none: packed batches pass host-int seq_lens here",
    "DeepSpeed and the trainer's train_step": "the engine, ZeRO and its optimizer do not run on fake tensors, and "
                                              "train_step ends in a read of the logged loss (the one read per "
                                              "step, declared site 'step_loss'): the step here is patched model "
                                              "+ fused loss + backward + SGD",
}
__doc__ += "\n".join(f"  * {what}: {why}." for what, why in UNEXECUTED.items())

WORKER = Path(__file__).with_name("cuda_paths_worker.py")
LAYERS = 2


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> dict[str, dict]:
    try:
        env = fake_cuda.environ()
    except RuntimeError as e:  # no C++ compiler here: nothing can be faked
        pytest.skip(str(e))
    out = tmp_path_factory.mktemp("cuda_paths") / "records.json"
    done = subprocess.run([sys.executable, str(WORKER), str(out)], env=env, capture_output=True, text=True,
                          timeout=600, cwd=WORKER.parent.parent)
    assert done.returncode == 0, done.stderr[-4000:]
    return {r["case"]: r for r in json.loads(out.read_text())}


def pick(records: dict, prefix: str) -> dict[str, dict]:
    found = {name: r for name, r in records.items() if name.startswith(prefix)}
    assert found, f"no case starts with {prefix!r}"
    return found


def world_of(name: str) -> int:
    return int(name.split("W=")[1].split()[0])


def test_every_case_runs_on_fake_cuda_with_only_declared_reads(records):
    failed = {n: r["error"] for n, r in records.items() if not r["ok"] and not n.startswith("planted")}
    assert not failed, failed
    worlds = {world_of(n) for n in records if "W=" in n}
    assert worlds == {1, 2, 4, 8}
    from seqpar.attention.registry import ATTENTIONS

    for name in ATTENTIONS:  # every registry attention, every world, every view (first, middle, last)
        views = {(world_of(n), n.split("rank=")[1]) for n in pick(records, f"attention {name} ")}
        assert views == {(1, "0"), (2, "0"), (2, "1"), (4, "0"), (4, "2"), (4, "3"), (8, "0"), (8, "4"), (8, "7")}
        trained = {world_of(n) for n in pick(records, f"train {name} ")}
        assert trained == {1, 2, 4, 8}, name


def test_the_check_catches_a_planted_host_read(records):
    """A ``.item()`` planted in ring attention's per-step merge fails its case, naming the line: the other cases
    passing means something."""
    (planted,) = pick(records, "planted read").values()
    assert not planted["ok"]
    assert "data-dependent read" in planted["error"] and "merge_into" in planted["error"], planted["error"]


FLASH = ["_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_backward"]
EFFICIENT = ["_scaled_dot_product_efficient_attention", "_scaled_dot_product_efficient_attention_backward"]


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_kernel_dispatch_on_cuda(records, dtype):
    """Half precision runs PyTorch's CUDA flash kernel with GQA K/V as they are; float32 the memory-efficient
    kernel (no tiled fallback), K/V repeated once per call (forward: K and V, backward: K and V); packed
    documents run fused pieces; head_dim 12 has no half-precision kernel (tiled, counted) but a float32 one."""
    fused = FLASH if dtype != "fp32" else EFFICIENT
    for name, r in pick(records, f"kernel auto {dtype} ").items():
        info = r["info"]
        if "head_dim=12" in name and dtype != "fp32":
            assert info["fused_ops"] == [] and sum(info["fallbacks"].values()) == 2, info
            continue
        assert info["fused_ops"] == fused, (name, info)
        assert info.get("fallbacks", {}) == {} and info.get("to_host", 0) == 0, (name, info)
        gqa = "gqa=True" in name or "docs" in name or "head_dim" in name
        if "repeats" in info:
            assert info["repeats"] == ([2, 2, 2, 2] if dtype == "fp32" and gqa else []), (name, info)
    torch_runs = pick(records, f"kernel torch {dtype} ")
    assert all(r["info"]["fused_ops"] == [] for r in torch_runs.values())
    assert sum(torch_runs[f"kernel torch {dtype} tensor-mask"]["info"]["fallbacks"].values()) == 2


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_flash_attn_packed_block_is_one_varlen_call(records, dtype):
    plain = records[f"kernel flash_attn {dtype}"]["info"]
    docs = records[f"kernel flash_attn {dtype} docs"]["info"]
    assert plain["calls"] == {"flash_attn_func": 1}
    assert docs["calls"] == {"flash_attn_varlen_func": 1}  # three documents, one kernel call, no merges
    assert docs["fused_ops"] == [FLASH[1]] and docs["repeats"] == []  # its backward: PyTorch's flash kernel


def test_each_attention_reads_once_per_validated_call(records):
    """The first layer's cross-rank check is one declared read (USP: two, its sub-groups and the shapes); the
    other layers read nothing; one device reads nothing at all."""
    for name, r in pick(records, "attention ").items():
        world, info = world_of(name), r["info"]
        want = {} if world == 1 else {"shape_check": 2 if name.startswith("attention usp") else 1}
        assert info["reads_validated"] == want, (name, info)
        assert info["reads_unvalidated"] == {}, (name, info)


def test_training_step_reads_only_at_its_first_layer(records):
    """A training step (gradient checkpointing with offload, tiled MLP, fused loss, bf16) reads the shape check
    once per forward (not again when the checkpointed layer is recomputed in the backward), the position flag
    at the patch's first forward only
    (none with packed documents), and copies to the host only what offload moves (one input per layer)."""
    for name, r in pick(records, "train ").items():
        if name.startswith("train lasp2"):
            continue
        world, steps = world_of(name), r["info"]["steps"]
        packed = r["info"].get("packed", False)
        first_forward = {} if packed else {"position_check": 1}
        checks = {} if world == 1 else {"shape_check": 2 if name.startswith("train usp") else 1}
        for i, step in enumerate(steps):
            assert step["reads"] == {**(first_forward if i == 0 else {}), **checks}, (name, i, step)
            assert step["to_host"] == LAYERS, (name, step)
        assert sum(r["info"]["calls"].values()) == 2 * LAYERS * len(steps), (name, r["info"])
    assert any(len(r["info"]["steps"]) == 2 for r in pick(records, "train ring").values())


def test_linear_attention_paths(records):
    for name, r in pick(records, "attention lasp2").items():
        want = {} if world_of(name) == 1 else {"shape_check": 1}
        assert r["info"] == {"reads_validated": want, "reads_unvalidated": {}}, (name, r["info"])
    for name, r in pick(records, "train lasp2").items():
        world = world_of(name)
        # LASP-2 compares lengths across ranks at the first linear layer of a forward only
        assert r["info"]["reads"] == ({} if world == 1 else {"shape_check": 1}), (name, r["info"])
        assert r["info"]["model_type"] == "linear_llama", r["info"]  # patch_model ran it through LASP-2


def test_shard_batch_on_cuda_ids(records):
    for name, r in pick(records, "shard_batch").items():
        local = 16
        for key, shapes in r["info"].items():
            assert shapes["input_ids"] == [[1, local], "int64", "cuda:0"], (name, key, shapes)
            assert shapes["labels"] == shapes["position_ids"] == [[1, local], "int64", "cuda:0"]
            if "docs=True" in key:  # host-int seq_lens: the boundaries are known, nothing read
                assert shapes["cu_seqlens"] == [[4], "int32", "cuda:0"]
        assert r["reads"] == {"padding_check": 1}, r["reads"]  # the attention-mask call only
