"""Launcher environments, layout validation and error messages (no process group needed, except the timeout)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from seqpar.parallel import (
    ParallelConfigError,
    default_device_backend,
    first_host,
    group_ranks,
    read_launch_env,
)
from seqpar.sharding import ShardingError, check_divisible, shard
from tests.dist import free_port


def test_torchrun_env():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "node0", "MASTER_PORT": "1234"}
    got = read_launch_env(env)
    assert (got.rank, got.world_size, got.local_rank, got.master_addr, got.master_port, got.launcher) == (
        3, 8, 1, "node0", 1234, "torchrun")


def test_slurm_env_without_torchrun():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
           "SLURM_NODELIST": "gpu[07-09,12],login1", "SLURM_JOB_ID": "4242"}
    got = read_launch_env(env)
    assert (got.rank, got.world_size, got.local_rank, got.master_addr, got.launcher) == (5, 16, 1, "gpu07", "slurm")
    assert got.master_port == 20000 + 4242


@pytest.mark.parametrize("nodelist,first", [("n1", "n1"), ("a[3-5]", "a3"), ("x[010,2]", "x010"), ("h1,h2", "h1")])
def test_first_host(nodelist, first):
    assert first_host(nodelist) == first


def test_single_process_env():
    assert read_launch_env({}).world_size == 1


def test_group_ranks_layout_and_errors():
    sp, dp = group_ranks(8, 4)
    assert sp == [[0, 1, 2, 3], [4, 5, 6, 7]] and dp == [[0, 4], [1, 5], [2, 6], [3, 7]]
    with pytest.raises(ParallelConfigError, match=r"world size 6 is not divisible by sp_size=4.*\[1, 2, 3, 6\]"):
        group_ranks(6, 4)
    with pytest.raises(ParallelConfigError, match="sp_size=8 is larger than the world size 4"):
        group_ranks(4, 8)


def test_cuda_requested_without_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ParallelConfigError, match="no CUDA GPU is visible"):
        default_device_backend("cuda")
    assert default_device_backend() == (torch.device("cpu"), "gloo")


def test_divisibility_errors_name_length_world_layout_and_nearest():
    with pytest.raises(ShardingError, match=r"seq_len=100 .* 3 ranks in the zigzag layout.*multiple of 6.*\[96, 102\]"):
        check_divisible(100, 3, "zigzag")
    with pytest.raises(ShardingError, match=r"layout='ring'"):
        check_divisible(8, 2, "ring")
    import torch

    with pytest.raises(ShardingError, match="seq_len=10"):
        shard(torch.zeros(1, 10), world_size=4, rank=0, layout="contiguous")


def test_rendezvous_timeout_names_the_address():
    """Rank 1 of 2 with no rank 0 anywhere: a clear error with the address, within the timeout."""
    port = free_port()
    code = textwrap.dedent(f"""
        from seqpar.parallel import ParallelState, RendezvousError
        env = {{"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "{port}"}}
        try:
            ParallelState.from_env(environ=env, timeout=3)
        except RendezvousError as err:
            print("ERR", err)
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert f"127.0.0.1:{port}" in res.stdout, res.stdout + res.stderr
    assert "could not join the rendezvous" in res.stdout
