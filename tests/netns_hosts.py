"""Two test hosts on one machine: network namespaces joined by a veth pair, addresses inside them only.

Each host runs its own torchrun; gloo must bind to the veth (``GLOO_SOCKET_IFNAME``) and torchrun must
advertise the host's own address (``--local-addr``), because the hostname resolves to 127.0.0.1 in every
namespace. The rendezvous store lives on the first host (``--rdzv_conf=is_host=true``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass

import pytest

SUBNET = "10.231.{}.{}"


@dataclass(frozen=True)
class Host:
    netns: str
    ifname: str
    addr: str

    def command(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *argv]

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        return {**(base or os.environ), "GLOO_SOCKET_IFNAME": self.ifname}


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


@pytest.fixture
def two_hosts():
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("network namespaces need root and iproute2")
    tag = uuid.uuid4().hex[:6]
    subnet = int(tag, 16) % 200 + 20
    hosts = [Host(f"sp{tag}h{i}", f"vsp{tag}{i}", SUBNET.format(subnet, i + 1)) for i in range(2)]
    made: list[str] = []
    try:
        for h in hosts:
            _ip("netns", "add", h.netns)
            made.append(h.netns)
        _ip("link", "add", hosts[0].ifname, "type", "veth", "peer", "name", hosts[1].ifname)
        for h in hosts:
            _ip("link", "set", h.ifname, "netns", h.netns)
            _ip("-n", h.netns, "addr", "add", f"{h.addr}/24", "dev", h.ifname)
            _ip("-n", h.netns, "link", "set", h.ifname, "up")
            _ip("-n", h.netns, "link", "set", "lo", "up")
    except subprocess.CalledProcessError as err:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        pytest.skip(f"cannot create network namespaces here: {err.stderr.strip()}")
    try:
        yield hosts
    finally:
        for ns in made:  # deleting a namespace deletes its end of the veth pair, and so the pair
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
