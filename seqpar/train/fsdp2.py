"""``engine: fsdp2``: PyTorch FSDP2 (``torch.distributed.fsdp.fully_shard``) on a (dp, sp) DeviceMesh, beside
DeepSpeed ZeRO (seqpar/train/engine.py), with sharded ``torch.distributed.checkpoint`` (DCP) checkpoints.

The mesh. ``ParallelState`` owns the process layout (SP group g = ranks [g S, (g+1) S), DP group j = ranks
{j, j+S, ...}). ``build_mesh`` does not lay ranks out again: it stacks ``group_ranks``'s SP groups into the
[D, S] grid and hands ParallelState's own two process groups to ``DeviceMesh.from_group``, so ``mesh["sp"]``
IS ``parallel.sp_group`` (``check_mesh`` verifies it, and refuses a mesh a caller built another way).

The sharding. Parameters, gradients and AdamW states are sharded over ALL W = D x S ranks: the flattened
``dp_sp`` dimension (row-major over the grid: ranks 0..W-1). The S ranks of an SP group hold different tokens
of the same sequences and compute partial gradients of the same weights, so they shard the weights exactly
like DP ranks do (torchtitan shards over ``dp_shard x cp`` the same way).

The reduction, exactly. The gradient of an optimizer step must be that of ``L = (1/T) sum_{r,m} S_{r,m}``
(seqpar.train.trainer.train_step: S_{r,m} the summed token loss of rank r's shard of micro-batch m, T the
step's target tokens): a SUM over all W ranks and G micro-steps, whichever axis a token fell on. This engine
keeps DeepSpeed's contract (engine.py), so the trainer's scaling is shared and unchanged: ``backward(x)``
backpropagates x / G, and the reduce-scatter AVERAGES over the W ranks of the flattened mesh (the divide
factor is pinned to W with ``set_gradient_divide_factor``; FSDP2 then uses ReduceOp.AVG, in float32:
``MixedPrecisionPolicy(reduce_dtype=float32)``). The trainer backpropagates ``x = (W G / T) S_{r,m}``, so
``g = (1/W) sum_r sum_m (1/G)(W G / T) dS_{r,m} = dL``: the W of the scale turns FSDP2's mean back into the
sum over the SP ranks (and DP ranks). Averaging over SP alone (a DDP/FSDP over the DP group that ignores SP,
or a divide factor of W with a scale of D G / T) gives dL / S: tests/test_fsdp2.py compares the logged
gradient norm (AdamW itself hardly sees a constant factor) with DeepSpeed's and with one process's.

Checkpoints are DCP folders (``<checkpoint>/fsdp2/``): each rank writes its own shards of the trainable
parameters and their AdamW states (tensors only: nothing is pickled but DCP's ``.metadata``, checked before
loading by seqpar.train.checkpoint), the LR schedule goes to ``schedule.json``. DCP reshards on load, so a
checkpoint resumes on another world size too (the data order then follows the new dp_size).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from seqpar.comm import world_sum
from seqpar.kernels.host import host_read
from seqpar.parallel import ParallelConfigError, ParallelState, group_ranks
from seqpar.train.recipe import Recipe

MESH_DIMS = ("dp", "sp")
FLAT_DIM = "dp_sp"


class MeshError(ParallelConfigError):
    """A DeviceMesh that is not ParallelState's layout (the CLI prints it as one line, exit code 2)."""


def _ranks(group: dist.ProcessGroup | None) -> list[int]:
    return dist.get_process_group_ranks(group) if group is not None else [0]


def build_mesh(parallel: ParallelState) -> Any:
    """The (dp, sp) DeviceMesh over ParallelState's own process groups (collective: every rank calls it)."""
    from torch.distributed.device_mesh import DeviceMesh

    sp_groups, _ = group_ranks(parallel.world_size, parallel.sp_size)  # the one layout: row g = SP group g
    grid = torch.tensor(sp_groups, dtype=torch.int)  # [D, S]; column j = DP group j
    mesh = DeviceMesh.from_group([parallel.dp_group, parallel.sp_group], parallel.device.type, mesh=grid,
                                 mesh_dim_names=MESH_DIMS)
    check_mesh(mesh, parallel)
    return mesh


def check_mesh(mesh: Any, parallel: ParallelState) -> None:
    """Raise MeshError unless ``mesh`` is the (dp, sp) mesh of ``parallel``: dimension names, shape
    dp_size x sp_size, and on this rank the same SP and DP ranks as ParallelState's groups (the SP attention
    runs on ``parallel.sp_group``; a mesh whose "sp" differs would shard the batch one way and reduce another)."""
    names = tuple(mesh.mesh_dim_names or ())
    want_shape = (parallel.dp_size, parallel.sp_size)
    if names != MESH_DIMS or tuple(mesh.shape) != want_shape:
        raise MeshError(f"device mesh {dict(zip(names, mesh.shape))} does not match the recipe: engine=fsdp2 needs "
                        f"dims {MESH_DIMS} of shape {want_shape} (dp_size {parallel.dp_size} x attention.sp_size "
                        f"{parallel.sp_size}): build it with seqpar.train.fsdp2.build_mesh(parallel)")
    for dim, group in (("sp", parallel.sp_group), ("dp", parallel.dp_group)):
        # the grid (what DTensor shards and flattens by) and the process group the mesh holds for the dim:
        # from_group stores the groups it is given without comparing them with the grid, so check both
        want = _ranks(group)
        got = mesh[dim].mesh.flatten().tolist()
        if got == want:
            got = _ranks(mesh.get_group(dim))
        if got != want:
            raise MeshError(f"device mesh dim {dim!r} holds ranks {got} on rank {parallel.rank}, but ParallelState's "
                            f"{dim.upper()} group holds {want} (SP groups are consecutive ranks, DP groups strided): "
                            "build the mesh with seqpar.train.fsdp2.build_mesh(parallel)")


def shard_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers (the model's ``_no_split_modules`` classes, as accelerate's FSDP auto-wrap uses):
    each becomes one FSDP2 unit, gathered just before its forward and freed after."""
    from seqpar.models.patch import _find_pretrained

    names = set(getattr(_find_pretrained(model), "_no_split_modules", None) or ())
    units = [m for m in model.modules() if type(m).__name__ in names]
    if not units:
        raise ParallelConfigError(f"engine=fsdp2 found no decoder layer ({sorted(names)}) in {type(model).__name__} "
                                  "to shard one by one: use engine=deepspeed for this model")
    return units


class FSDP2Engine(torch.nn.Module):
    """The DeepSpeed-engine surface the trainer uses (``module``, forward, ``backward``, ``step``, ``get_lr``,
    ``get_global_grad_norm``) over an FSDP2-sharded model, torch AdamW and the recipe's LR schedule."""

    def __init__(self, module: torch.nn.Module, recipe: Recipe, mesh: Any, flat: Any, parallel: ParallelState):
        super().__init__()
        t = recipe.trainer
        self.module, self.mesh, self.flat, self.parallel = module, mesh, flat, parallel  # flat: the sharding mesh
        self.grad_accum, self.max_grad_norm, self.micro = t.grad_accum, t.max_grad_norm, 0
        self.params = [p for p in module.parameters() if p.requires_grad]
        from seqpar.train.engine import lr_lambda

        self.optimizer = torch.optim.AdamW(self.params, lr=t.lr, betas=tuple(t.betas), eps=1e-8,
                                           weight_decay=t.weight_decay)  # DeepSpeed's torch_adam: the same AdamW
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(recipe))
        self.grad_norm: torch.Tensor | None = None
        self.lora = recipe.lora.enabled

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate ``loss / G`` (DeepSpeed's contract, module docstring); FSDP2 reduce-scatters the
        gradients in float32 and accumulates the sharded ones over the micro-steps."""
        (loss / self.grad_accum).backward()

    def step(self) -> None:
        """Called after every micro-step; at the G-th: clip to trainer.max_grad_norm by the global norm (over
        all shards), AdamW, LR schedule, zero the gradients."""
        self.micro += 1
        if self.micro % self.grad_accum:
            return
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # a replicated DTensor
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(self.params, self.max_grad_norm, norm)
        self.grad_norm = norm.detach()  # read in get_global_grad_norm, after the step's one host sync
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def get_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def get_global_grad_norm(self) -> float | None:
        return None if self.grad_norm is None else host_read(self.grad_norm, "grad_norm")

    # -- checkpoints (collective) ------------------------------------------------------------------------

    def _options(self, **extra: Any) -> Any:
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(ignore_frozen_params=self.lora, **extra)  # LoRA: the frozen base is base_model/

    def save_state(self, folder: Path) -> None:
        """Sharded DCP checkpoint of the trainable parameters and their AdamW states (every rank writes its
        shards), and the LR schedule (rank 0, JSON)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.module, self.optimizer, options=self._options())
        dcp.save({"model": model_sd, "optim": optim_sd["state"]}, checkpoint_id=str(folder))
        if self.parallel.is_main:
            (folder / "schedule.json").write_text(json.dumps(self.scheduler.state_dict()))

    def load_state(self, folder: Path) -> None:
        """Load the shards into this run's sharding (DCP reshards across world sizes), then the schedule; the
        optimizer's learning rate is set from the schedule (DeepSpeed restores it with the optimizer)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(self.module, self.optimizer, options=self._options())
        state = {"model": model_sd, "optim": optim_sd["state"]}
        dcp.load(state, checkpoint_id=str(folder))
        # dcp.load already refused a checkpoint lacking any requested (trainable) key; not strict: with LoRA the
        # frozen base is not in the checkpoint (it stays as loaded from base_model/)
        set_state_dict(self.module, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict={"state": state["optim"], "param_groups": optim_sd["param_groups"]},
                       options=self._options(strict=False))
        self.scheduler.load_state_dict(json.loads((folder / "schedule.json").read_text()))
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Collective: the unsharded trainable (LoRA) or all (full fine-tuning) weights, on rank 0's CPU only."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(self.module, options=self._options(full_state_dict=True, cpu_offload=True))

    def describe(self) -> dict:
        """Collective: what is sharded, for the startup line and tests/test_fsdp2.py (the feature is engaged)."""
        from torch.distributed.tensor import DTensor, Shard

        params = list(self.module.parameters())
        sharded = [p for p in params if isinstance(p, DTensor) and tuple(p.placements) == (Shard(0),)]
        local = torch.tensor([sum(p.to_local().numel() for p in sharded)], dtype=torch.float64,
                             device=self.parallel.device)  # NCCL reduces device tensors only
        summed = host_read(world_sum(local) if dist.is_initialized() else local, "setup_describe")[0]
        units = _fsdp_modules(self.module)
        factors = {g.gradient_divide_factor for m in units for g in m._get_fsdp_state()._fsdp_param_groups}
        return {"parameters": len(params), "dtensor_shard0": len(sharded), "numel": sum(p.numel() for p in params),
                "local_numel_summed": int(summed), "mesh": dict(zip(MESH_DIMS, self.mesh.shape)),
                "shard_ranks": _ranks(self.flat.get_group()), "sp_ranks": _ranks(self.mesh.get_group("sp")),
                "dp_ranks": _ranks(self.mesh.get_group("dp")), "divide_factors": sorted(f or 0 for f in factors),
                "units": len(units)}


def _fsdp_modules(module: torch.nn.Module) -> list[Any]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in module.modules() if isinstance(m, FSDPModule)]


def build_fsdp2_engine(model: torch.nn.Module, recipe: Recipe, parallel: ParallelState) -> FSDP2Engine:
    """Mesh, ``fully_shard`` (each decoder layer, then the root) over the flattened dp x sp ranks, float32
    reduction, the divide factor pinned to W, AdamW and the LR schedule."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mesh = build_mesh(parallel)
    flat = mesh[MESH_DIMS]._flatten(FLAT_DIM)  # row-major over the [D, S] grid: ranks 0..W-1
    bf16 = recipe.trainer.dtype == "bf16"
    # bf16 compute from float32 sharded master weights; gradients reduced (and accumulated) in float32
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
    f = recipe.fsdp2
    offload = CPUOffloadPolicy(pin_memory=True) if f.offload == "cpu" else OffloadPolicy()
    # fully_shard moves each rank's shards to the mesh's device: the whole unsharded model never goes there
    for unit in shard_units(model):
        fully_shard(unit, mesh=flat, reshard_after_forward=f.reshard_after_forward, mp_policy=mp,
                    offload_policy=offload)
    # the root (embeddings, final norm, head): its weights are needed again at once by the backward
    fully_shard(model, mesh=flat, reshard_after_forward=False, mp_policy=mp, offload_policy=offload)
    if parallel.world_size > 1:  # pinned: the mean over all W ranks (module docstring); W = 1 sums nothing
        for unit in _fsdp_modules(model):
            unit.set_gradient_divide_factor(float(parallel.world_size))
    return FSDP2Engine(model, recipe, mesh, flat, parallel)
