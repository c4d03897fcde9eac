"""``engine: fsdp2`` (issue 27): FSDP2 on a (dp, sp) DeviceMesh trains like DeepSpeed ZeRO-2 and like one process.

Three launches run side by side (one module fixture), the quick start's tiny Llama with S2-Attn and LoRA:

1. FSDP2 at SP = 2 x DP = 2 on 4 gloo ranks (recipes/fsdp2-cpu.yaml: activation checkpointing; plus the
   fused loss and the tiled MLP), 10 steps, under ``torchrun --max-restarts 2`` with ``checkpoint.resume=auto``
   and test-only faults (seqpar/train/faults.py):
   attempt 0 gets SIGUSR1 on rank 3 in step 2 (preemption: it saves step 2 and exits 75), attempt 1 resumes
   from step 2 and rank 3 is SIGKILLed while writing the step-6 checkpoint (its DCP shard is on disk, the rest
   is not), attempt 2 resumes from step 3 and finishes;
2. DeepSpeed ZeRO-2 on the same 4 ranks and recipe (recipes/quickstart-cpu.yaml with the same overrides);
3. one process (DeepSpeed, sp_size 1) accumulating the same 2 sequences per step (grad_accum 2).
(2 and 3 are the session's SP x DP references, tests/sp_dp_runs.py, shared with tests/test_train.py and
tests/test_multinode.py; they start here, beside the FSDP2 launches.)

The interrupted FSDP2 run's 10 losses (each step logged once) and its final adapter equal both references to
float32 precision; so do its gradient norms. The norms matter: AdamW hardly sees a constant factor on the
gradients (and clipping removes it), so a reduction that averaged over the SP ranks instead of summing
(g / 2) would leave the losses nearly unchanged but halve the norm, which the 1e-5 comparison refuses.
A reduction that skipped the SP ranks altogether would leave them with different weights: the losses differ.
The startup line shows the feature engaged: every parameter a Shard(0) DTensor over the 4 ranks of the
flattened mesh, whose "sp" groups are ParallelState's.

A fourth launch resumes the preemption's step-2 checkpoint on 2 ranks (SP 2 x DP 1, grad_accum 2: the same
batches): DCP reshards it, and steps 3 and 4 equal the 4-rank run's.

Bad input: one-line errors, checked in-process (``validate`` and ``seqpar train``'s error path: exit 2, no
traceback) and for a hand-built mesh that is not ParallelState's (a fake process group, no rendezvous).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.resume_harness import ROOT, adapter, clean_env, max_difference, metrics
from tests.sp_dp_runs import COMMON, STEPS
from tests.test_train import QUICK

pytestmark = pytest.mark.timeout(500)

FSDP2 = ROOT / "recipes" / "fsdp2-cpu.yaml"
# COMMON (tests/sp_dp_runs.py): 10 steps of 256 tokens (128 per SP rank); the FSDP2 run checkpoints activations
# (its recipe), the references do not (recomputation changes no value)
# the memory options ride along in the FSDP2 run (engine-independent; offload is a no-op without CUDA): tiles
# shorter than a rank's 128 tokens
MEMORY = ["memory.fused_loss=true", "memory.loss_chunk_size=50", "memory.tiled_mlp=true", "memory.mlp_chunk_size=48",
          "memory.offload_checkpoints=true"]
FAULTS = {"SEQPAR_FAULT_RANK": "3", "SEQPAR_FAULT_SIGNAL_AT_STEP": "2", "SEQPAR_FAULT_KILL_IN_SAVE": "6@1"}


def fsdp2_torchrun(out: Path, overrides: list[str], *, nproc: int = 4, restarts: int = 0,
                   **faults: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "--max-restarts", str(restarts), "-m", "seqpar", "train", str(FSDP2), f"trainer.output_dir={out}",
           *overrides]
    proc = subprocess.run(cmd, env=clean_env(**faults), capture_output=True, text=True, timeout=400, cwd=out.parent)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc


def bad_cli(monkeypatch, capsys) -> tuple[int, str]:
    """``seqpar train`` (in-process: its error path prints before any rendezvous) as rank 0 of 4."""
    import argparse

    from seqpar.train import cli

    monkeypatch.setenv("WORLD_SIZE", "4")
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args([str(FSDP2), "deepspeed.zero_stage=3", "fsdp2.dp_size=3", "attention.sp_size=3"])
    code = cli.run(args)
    return code, capsys.readouterr().err


def resume_on_two_ranks(tmp: Path) -> subprocess.CompletedProcess:
    """As soon as the 4-rank run has its step-2 checkpoint (the preemption's), resume a copy of it on 2 ranks (SP 2
    x DP 1) for steps 3 and 4: DCP reshards it, and grad_accum 2 keeps the global batch (the same samples)."""
    import time

    src, out = tmp / "fsdp2", tmp / "reshard"
    ckpt = src / "checkpoints" / "step-00000002"
    deadline = time.monotonic() + 300
    while not (ckpt / "COMPLETE").is_file():  # the marker of the renamed, complete folder
        assert time.monotonic() < deadline, "the 4-rank run wrote no step-2 checkpoint"
        time.sleep(0.5)
    shutil.copytree(ckpt, out / "checkpoints" / ckpt.name)
    shutil.copytree(src / "base_model", out / "base_model")
    return fsdp2_torchrun(out, [*COMMON, *MEMORY, "trainer.max_steps=4", "trainer.grad_accum=2", "checkpoint.every=0",
                                "checkpoint.resume=auto"], nproc=2)


MESH_CHECKS = """
import json, torch, torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from seqpar.parallel import ParallelState
from seqpar.train.cli import error_line
from seqpar.train.fsdp2 import MeshError, build_mesh, check_mesh

dist.init_process_group("fake", store=FakeStore(), rank=5, world_size=8)  # rank 5 of 8, no peers needed
ranks = dist.get_process_group_ranks
out = {"layouts": {}, "errors": []}
for sp in (1, 2, 4, 8):
    ps = ParallelState.from_initialized(sp, device="cpu")
    mesh = build_mesh(ps)
    # the mesh's grid (what DTensor shards by; from_group does not derive it from the groups) against the
    # groups ParallelState built independently
    out["layouts"][sp] = {"mesh_sp": mesh["sp"].mesh.tolist(), "state_sp": ranks(ps.sp_group),
                          "mesh_dp": mesh["dp"].mesh.tolist(), "state_dp": ranks(ps.dp_group),
                          "flat": mesh["dp", "sp"]._flatten("dp_sp").mesh.tolist()}
ps = ParallelState.from_initialized(2, device="cpu")
strided_sp = DeviceMesh("cpu", torch.arange(8).view(2, 4).T.contiguous(), mesh_dim_names=("dp", "sp"))
for wrong in (strided_sp, init_device_mesh("cpu", (2, 4), mesh_dim_names=("sp", "dp")),
              init_device_mesh("cpu", (8,), mesh_dim_names=("dp",))):
    try:
        check_mesh(wrong, ps)
        out["errors"].append(None)
    except MeshError as err:
        out["errors"].append(error_line(err))
print("RESULT " + json.dumps(out))
"""


def mesh_checks(tmp: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", MESH_CHECKS], env=clean_env(), capture_output=True, text=True,
                          timeout=120, cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.split("RESULT ", 1)[1])


@pytest.fixture(scope="module")
def runs(tmp_path_factory, sp_dp_runs):
    tmp = tmp_path_factory.mktemp("fsdp2")
    sp_dp_runs.start("zero2", "one")  # the DeepSpeed references (tests/sp_dp_runs.py), in the background
    with ThreadPoolExecutor(3) as pool:
        fsdp = pool.submit(fsdp2_torchrun, tmp / "fsdp2", [*COMMON, *MEMORY, "checkpoint.every=3",
                                                           "checkpoint.resume=auto"], restarts=2, **FAULTS)
        mesh, reshard = pool.submit(mesh_checks, tmp), pool.submit(resume_on_two_ranks, tmp)
        done = {"fsdp2": fsdp.result(), "mesh": mesh.result(), "reshard": reshard.result()}
    return {"tmp": tmp, **done, **{name: sp_dp_runs.records(name) for name in ("zero2", "one")},
            "ref": {name: sp_dp_runs.folder(name) for name in ("zero2", "one")}}


def log(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout + proc.stderr


def test_fsdp2_is_engaged_on_the_parallel_state_mesh(runs):
    line = next(x for x in log(runs["fsdp2"]).splitlines() if x.startswith("seqpar: fsdp2 "))
    facts = json.loads(line.removeprefix("seqpar: fsdp2 "))
    print(line)
    assert facts["mesh"] == {"dp": 2, "sp": 2} and facts["shard_ranks"] == [0, 1, 2, 3]
    assert facts["sp_ranks"] == [0, 1] and facts["dp_ranks"] == [0, 2]  # rank 0's groups: ParallelState's
    # every parameter (frozen base and LoRA alike) is a DTensor sharded on dim 0; the local shards of the 4 ranks
    # add up to the model: nothing is replicated
    assert facts["dtensor_shard0"] == facts["parameters"] > 0 and facts["local_numel_summed"] == facts["numel"]
    assert facts["units"] == 3 and facts["divide_factors"] == [4.0]  # 2 decoder layers + root; mean over W = 4
    assert "memory: fused loss (tiles of 50 tokens), tiled MLP (tiles of 48 tokens)" in log(runs["fsdp2"])
    dcp = runs["tmp"] / "fsdp2" / "checkpoints" / f"step-{STEPS:08d}" / "fsdp2"
    assert sorted(p.name for p in dcp.glob("*.distcp")) == [f"__{r}_0.distcp" for r in range(4)]  # one per rank
    assert (dcp / ".metadata").is_file() and (dcp / "schedule.json").is_file()


def test_the_mesh_is_parallel_states_layout_and_another_is_refused(runs):
    """8 ranks, as rank 5: for every sp_size the mesh's groups are the very groups ParallelState built."""
    layouts, errors = runs["mesh"]["layouts"], runs["mesh"]["errors"]
    for sp, g in layouts.items():
        assert g["mesh_sp"] == g["state_sp"] and g["mesh_dp"] == g["state_dp"] and g["flat"] == list(range(8)), sp
    assert layouts["2"]["mesh_sp"] == [4, 5] and layouts["2"]["mesh_dp"] == [1, 3, 5, 7]
    assert all(e is not None and "\n" not in e and e.startswith("seqpar: error: device mesh") for e in errors), errors
    assert "dim 'sp' holds ranks [1, 5] on rank 5, but ParallelState's SP group holds [4, 5]" in errors[0]
    assert "{'sp': 2, 'dp': 4} does not match the recipe" in errors[1] and "of shape (4, 2)" in errors[1]
    assert "build_mesh(parallel)" in errors[2]


def test_losses_and_gradient_norms_equal_zero2_and_one_process(runs):
    tmp = runs["tmp"]
    got, zero2, one = metrics(tmp / "fsdp2"), metrics(runs["ref"]["zero2"]), metrics(runs["ref"]["one"])
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))  # each step once across the three attempts
    assert len(zero2) == len(one) == STEPS
    for name, ref in (("zero2", zero2), ("one process", one)):
        loss = max(abs(a["loss"] - b["loss"]) for a, b in zip(got, ref))
        norm = max(abs(a["grad_norm"] - b["grad_norm"]) / b["grad_norm"] for a, b in zip(got, ref))
        print(f"fsdp2 (preempted + crashed, resumed) vs {name}: max |loss difference| {loss:.2e}, "
              f"max relative grad-norm difference {norm:.2e} over {STEPS} steps")
        assert loss <= 1e-5 and norm <= 1e-5, ([r["loss"] for r in got], [r["loss"] for r in ref])
    assert got[-1]["loss"] < got[0]["loss"] - 0.2  # it learns


def test_final_weights_equal_zero2_and_one_process(runs):
    tmp = runs["tmp"]
    got = adapter(tmp / "fsdp2", STEPS)
    for name in ("zero2", "one"):
        worst = max_difference(got, adapter(runs["ref"][name], STEPS))
        print(f"fsdp2 vs {name}: max |adapter weight difference| = {worst:.2e}")
        assert worst <= 1e-5
    base = adapter(tmp / "fsdp2", STEPS)
    assert max(v.abs().max().item() for k, v in base.items() if "lora_B" in k) > 1e-3  # LoRA B trained from 0


def test_preemption_and_crash_resume_from_the_newest_complete_checkpoint(runs):
    text = log(runs["fsdp2"])
    assert text.count("seqpar fault: SIGUSR1 to rank 3 during step 2") == 1, text[-4000:]
    assert "seqpar: preempted: stopped after step 2" in text, text[-4000:]
    assert text.count("seqpar fault: SIGKILL rank 3 while saving step 6 (attempt 1)") == 1, text[-4000:]
    # attempt 1 resumed from the preemption's checkpoint, attempt 2 from step 3: the half-written step 6 (a .tmp-
    # folder holding rank 3's DCP shard) was never taken for a checkpoint
    assert text.count(f"{os.sep}step-00000002 at step 2") == 1 and text.count(f"{os.sep}step-00000003 at step 3") == 1
    root = runs["tmp"] / "fsdp2" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-00000009", f"step-{STEPS:08d}"]  # keep=2, no .tmp-


def test_a_checkpoint_resumes_on_another_world_size(runs):
    """The 4-rank step-2 checkpoint resumed on 2 ranks: the same losses and gradient norms for steps 3 and 4."""
    assert "step-00000002 at step 2 (written by 4 ranks, resharded to 2)" in log(runs["reshard"])
    got, want = metrics(runs["tmp"] / "reshard"), metrics(runs["tmp"] / "fsdp2")[2:4]
    assert [r["step"] for r in got] == [r["step"] for r in want] == [3, 4]
    loss = max(abs(a["loss"] - b["loss"]) for a, b in zip(got, want))
    norm = max(abs(a["grad_norm"] - b["grad_norm"]) / b["grad_norm"] for a, b in zip(got, want))
    print(f"resumed on 2 ranks vs 4: max |loss difference| {loss:.2e}, relative grad-norm difference {norm:.2e}")
    assert loss <= 1e-5 and norm <= 1e-5


def test_checkpoint_verification_knows_dcp(runs, tmp_path):
    """An FSDP2 checkpoint resumes on another world size (DCP reshards), never with the other engine, and a
    ``.metadata`` that would import anything but DCP's classes is refused before anything is unpickled."""
    from seqpar.train.checkpoint import CheckpointError, verify_checkpoint, write_manifest
    from seqpar.train.recipe import load_recipe

    ckpt = runs["tmp"] / "fsdp2" / "checkpoints" / f"step-{STEPS:08d}"
    recipe = load_recipe(ckpt / "recipe.yaml")
    assert recipe.engine == "fsdp2" and "deepspeed" not in recipe.to_dict()
    assert verify_checkpoint(ckpt, recipe, 4) == verify_checkpoint(ckpt, recipe, 2) == STEPS
    with pytest.raises(CheckpointError, match="written by engine=fsdp2; this run has engine=deepspeed"):
        verify_checkpoint(ckpt, load_recipe(QUICK, COMMON), 4)
    bad = tmp_path / ckpt.name
    shutil.copytree(ckpt, bad)
    (bad / "fsdp2" / ".metadata").write_bytes(pickle.dumps(os.system))  # would import os.system
    (bad / "manifest.json").unlink()
    write_manifest(bad)
    with pytest.raises(CheckpointError, match=r"\.metadata refused: unpickling it would import \['posix.system'\]"):
        verify_checkpoint(bad, recipe, 4)


def test_bad_input_is_one_line(monkeypatch, capsys):
    """SP size not dividing the world, FSDP2 with a ZeRO section, a mesh (fsdp2.dp_size) that does not cover the
    world: ``seqpar train`` prints them in one line, exit code 2, before any rendezvous, no traceback."""
    code, err = bad_cli(monkeypatch, capsys)
    lines = [x for x in err.splitlines() if x.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("seqpar: error: invalid recipe ("), err
    assert "attention.sp_size=3 does not divide the world size 4" in lines[0]
    assert "engine=fsdp2 with a deepspeed section (deepspeed.zero_stage=3)" in lines[0]
    assert "fsdp2.dp_size=3 x attention.sp_size=3 = 9 ranks, but the world has 4" in lines[0]
    assert "Traceback" not in err


@pytest.mark.parametrize(("overrides", "world", "message"), [
    (["deepspeed.offload=cpu"], 4, "engine=fsdp2 with a deepspeed section"),
    (["engine=deepspeed"], 4, "fsdp2 section with engine=deepspeed"),
    (["fsdp2.dp_size=1"], 4, "fsdp2.dp_size=1 x attention.sp_size=2 = 2 ranks, but the world has 4: the (dp, sp) "
                             "mesh must cover every rank once: use fsdp2.dp_size=2"),
    (["attention.sp_size=4"], 6, "attention.sp_size=4 does not divide the world size 6"),
    (["fsdp2.offload=cpu"], 4, "fsdp2.offload=cpu moves sharded parameters"),
])
def test_recipe_errors(overrides, world, message):
    from seqpar.train.recipe import RecipeError, load_recipe
    from seqpar.train.validate import validate

    with pytest.raises(RecipeError) as err:
        validate(load_recipe(FSDP2, overrides), world)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_valid_fsdp2_recipes_pass_and_save_only_their_engine_section(tmp_path):
    from seqpar.train.recipe import load_recipe, save_recipe
    from seqpar.train.validate import validate

    recipe = load_recipe(FSDP2, ["fsdp2.dp_size=2"])
    validate(recipe, 4)
    validate(load_recipe(FSDP2, ["fsdp2.reshard_after_forward=false"]), 2)
    save_recipe(recipe, tmp_path / "r.yaml")
    again = load_recipe(tmp_path / "r.yaml")
    validate(again, 4)
    assert again.fsdp2.dp_size == 2 and "deepspeed" not in again.to_dict()
    assert "fsdp2" not in load_recipe(QUICK).to_dict()  # DeepSpeed recipes save no fsdp2 section
