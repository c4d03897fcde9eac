"""Process layout: sequence-parallel (SP) groups of consecutive ranks, data-parallel (DP) groups across them.

``ParallelState`` is the one object that owns process groups; primitives receive a group explicitly
(``group=state.sp_group``) and nothing is kept in module globals. It is built from the environment that
``torchrun`` sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) or, when a job is started by
``srun`` without torchrun, from SLURM's (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_NODELIST).

With world size W and ``sp_size`` S, SP group g holds ranks [g*S, (g+1)*S): consecutive ranks, so SP
stays inside a node where its all-to-all and ring traffic is cheapest; DP group j holds ranks
{j, j+S, j+2S, ...}.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


class ParallelConfigError(ValueError):
    """A process layout that cannot be built (bad sp_size, world size, device or backend)."""


class RendezvousError(RuntimeError):
    """The process group could not be initialised in time."""


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in the job, as its launcher described it."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun", "slurm" or "single"


def first_host(nodelist: str) -> str:
    """First host of a SLURM hostlist: ``"gpu[03-05,9],cpu1" -> "gpu03"``."""
    head = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if head is None:
        raise ParallelConfigError(f"SLURM_NODELIST={nodelist!r} is not a SLURM hostlist")
    prefix, bracket = head.group(1), head.group(3)
    if bracket is None:
        return prefix
    first = bracket.split(",")[0].split("-")[0]
    return prefix + first


def read_launch_env(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """Read rank, world size and rendezvous address from torchrun's or SLURM's variables.

    torchrun's variables win when both are present (srun -> torchrun sets both). Without either,
    this is a single process on 127.0.0.1.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
            launcher="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodelist = env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "127.0.0.1"))
        # One port per job, so two jobs sharing a node do not collide on the rendezvous.
        default_port = 20000 + int(env.get("SLURM_JOB_ID", 9500)) % 20000
        return LaunchEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            master_addr=env.get("MASTER_ADDR", first_host(nodelist)),
            master_port=int(env.get("MASTER_PORT", default_port)),
            launcher="slurm",
        )
    return LaunchEnv(0, 1, 0, env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)), "single")


def group_ranks(world_size: int, sp_size: int) -> tuple[list[list[int]], list[list[int]]]:
    """Ranks of every SP group (consecutive) and every DP group (strided) for this layout."""
    if sp_size < 1:
        raise ParallelConfigError(f"sp_size={sp_size} must be >= 1")
    if sp_size > world_size:
        raise ParallelConfigError(
            f"sp_size={sp_size} is larger than the world size {world_size}: "
            f"launch at least {sp_size} processes or lower sp_size"
        )
    if world_size % sp_size:
        divisors = [d for d in range(1, world_size + 1) if world_size % d == 0]
        raise ParallelConfigError(
            f"world size {world_size} is not divisible by sp_size={sp_size}: "
            f"use sp_size in {divisors} or launch a multiple of {sp_size} processes"
        )
    sp = [list(range(g * sp_size, (g + 1) * sp_size)) for g in range(world_size // sp_size)]
    dp = [list(range(j, world_size, sp_size)) for j in range(sp_size)]
    return sp, dp


def default_device_backend(device: str | None = None, backend: str | None = None) -> tuple[torch.device, str]:
    """cuda + nccl when a GPU is present, else cpu + gloo; either can be forced."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ParallelConfigError(
            f"device={device!r} was requested but no CUDA GPU is visible "
            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda is not None}): use device='cpu'"
        )
    if backend is None:
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend == "nccl" and dev.type != "cuda":
        raise ParallelConfigError("backend='nccl' needs CUDA tensors: use backend='gloo' with device='cpu'")
    return dev, backend


@dataclass
class ParallelState:
    """This process's rank, its device, and the SP and DP groups it belongs to."""

    rank: int
    world_size: int
    local_rank: int
    sp_size: int
    device: torch.device
    backend: str
    sp_group: dist.ProcessGroup | None
    dp_group: dist.ProcessGroup | None

    @property
    def dp_size(self) -> int:
        return self.world_size // self.sp_size

    @property
    def sp_rank(self) -> int:
        return self.rank % self.sp_size

    @property
    def dp_rank(self) -> int:
        return self.rank // self.sp_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(
        cls,
        sp_size: int = 1,
        *,
        device: str | None = None,
        backend: str | None = None,
        timeout: timedelta | float = timedelta(minutes=10),
        environ: Mapping[str, str] | None = None,
    ) -> ParallelState:
        """Initialise torch.distributed from the launcher's environment (if needed) and build the groups.

        Raises ParallelConfigError for an impossible layout before any rendezvous, and RendezvousError,
        naming MASTER_ADDR:MASTER_PORT, when the other ranks do not arrive within ``timeout``.
        """
        launch = read_launch_env(environ)
        group_ranks(launch.world_size, sp_size)  # validate before waiting on anybody
        dev, backend = default_device_backend(device, backend)
        if dev.type == "cuda":
            dev = torch.device("cuda", launch.local_rank % torch.cuda.device_count())
            torch.cuda.set_device(dev)
        if not isinstance(timeout, timedelta):
            timeout = timedelta(seconds=float(timeout))
        if not dist.is_initialized():
            _init_process_group(launch, backend, timeout)
        return cls.from_initialized(sp_size, device=dev)

    @classmethod
    def from_initialized(cls, sp_size: int = 1, *, device: torch.device | str | None = None) -> ParallelState:
        """Build the groups over an already initialised default process group (collective: all ranks call it)."""
        world, rank = dist.get_world_size(), dist.get_rank()
        sp_ranks, dp_ranks = group_ranks(world, sp_size)
        backend = dist.get_backend()
        if device is None:
            device, _ = default_device_backend(None, backend)
        # new_group is collective over the whole world: every rank creates every group, in the same order.
        sp_group = dp_group = None
        for ranks in sp_ranks:
            g = dist.new_group(ranks)
            if rank in ranks:
                sp_group = g
        for ranks in dp_ranks:
            g = dist.new_group(ranks)
            if rank in ranks:
                dp_group = g
        local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
        return cls(rank, world, local_rank, sp_size, torch.device(device), backend, sp_group, dp_group)

    def describe(self) -> str:
        return (
            f"rank {self.rank}/{self.world_size} sp_rank {self.sp_rank}/{self.sp_size} "
            f"dp_rank {self.dp_rank}/{self.dp_size} device {self.device} backend {self.backend}"
        )

    def destroy(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def _init_process_group(launch: LaunchEnv, backend: str, timeout: timedelta) -> None:
    """Join the default group. Under torchrun its keys are prefixed by the restart attempt: torchrun's store
    outlives a failed attempt, and a restarted group would otherwise read the dead ranks' addresses."""
    addr = f"{launch.master_addr}:{launch.master_port}"
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    try:
        if attempt is not None:
            store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
            dist.init_process_group(backend, store=dist.PrefixStore(f"seqpar/attempt{attempt}", store), rank=rank,
                                    world_size=world, timeout=timeout)
            return
        if launch.launcher == "single":  # one plain process: an in-memory store, no TCP port to collide on
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
            return
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://{addr}",
            rank=launch.rank,
            world_size=launch.world_size,
            timeout=timeout,
        )
    except (RuntimeError, TimeoutError, ConnectionError) as err:
        raise RendezvousError(
            f"rank {launch.rank} of {launch.world_size} could not join the rendezvous at {addr} within "
            f"{timeout.total_seconds():.0f}s ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). "
            "Check that every rank was started, that MASTER_ADDR/MASTER_PORT point at rank 0's host, "
            "and that the port is reachable"
        ) from err
