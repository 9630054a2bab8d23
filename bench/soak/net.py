"""The simulated hosts: one network namespace per host, each joined to one bridge
in the root namespace by a veth pair. Every name starts with `sk-`/`skv-`, so a
run that crashed is cleaned up by the next one (`cleanup`). Only addresses of
this bridge are used, all inside namespaces the soak made."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from dataclasses import dataclass

BRIDGE = "sk-br0"
SUBNET = "10.231.0"
ROOT_IP = f"{SUBNET}.1"  # the bridge's own address: the soak's side (fake, inserts)


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


@dataclass(frozen=True)
class Host:
    name: str  # short: h1, pg1
    ip: str

    @property
    def ns(self) -> str:
        return f"sk-{self.name}"

    @property
    def veth(self) -> str:  # the root side of its link
        return f"skv-{self.name}"

    def exec(self) -> list[str]:
        return ["ip", "netns", "exec", self.ns]


def namespaces() -> list[str]:
    out = ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith("sk-")]


def cleanup() -> list[int]:
    """Remove what an earlier run left (its namespaces, the processes still in
    them, the bridge); the ids of the processes it ended."""
    ended = []
    for ns in namespaces():
        for pid in ip("netns", "pids", ns, check=False).stdout.split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
                ended.append(int(pid))
        ip("netns", "del", ns, check=False)
    ip("link", "del", BRIDGE, check=False)
    return ended


def setup(hosts: list[Host]) -> None:
    ip("link", "add", BRIDGE, "type", "bridge")
    ip("addr", "add", f"{ROOT_IP}/24", "dev", BRIDGE)
    ip("link", "set", BRIDGE, "up")
    for h in hosts:
        ip("netns", "add", h.ns)
        peer = f"skp-{h.name}"
        ip("link", "add", h.veth, "type", "veth", "peer", "name", peer)
        ip("link", "set", peer, "netns", h.ns)
        ip("link", "set", h.veth, "master", BRIDGE, "up")
        ip("-n", h.ns, "link", "set", "lo", "up")
        ip("-n", h.ns, "link", "set", peer, "name", "eth0")
        ip("-n", h.ns, "addr", "add", f"{h.ip}/24", "dev", "eth0")
        ip("-n", h.ns, "link", "set", "eth0", "up")


def link(host: Host, up: bool) -> None:
    """Cut (or restore) the host's only link."""
    ip("link", "set", host.veth, "up" if up else "down")


# When the kernel has no netem (sch_netem), the link is shaped with tbf instead:
# a slow link whose queue delays what waits in it; no random loss.
FALLBACK = "tbf rate 256kbit burst 16kbit latency 400ms"


def netem(host: Host, spec: str | None) -> str:
    """Delay and loss on the host's link (tc netem `spec`), or none; what was
    applied."""
    tc = [*host.exec(), "tc", "qdisc"]
    if spec is None:
        subprocess.run([*tc, "del", "dev", "eth0", "root"], capture_output=True, check=False)
        return ""
    cmd = [*tc, "replace", "dev", "eth0", "root"]
    if subprocess.run([*cmd, "netem", *spec.split()], capture_output=True).returncode == 0:
        return f"netem {spec}"
    subprocess.run([*cmd, *FALLBACK.split()], capture_output=True, check=True)
    return FALLBACK
