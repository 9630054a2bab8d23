"""The simulated hosts: one network namespace per host, each joined to one bridge
in the root namespace by a veth pair. Every name starts with `sk-`/`skv-`, so a
run that crashed is cleaned up by the next one (`cleanup`). Only addresses of
this bridge are used, all inside namespaces the soak made."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

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
    stop_wire()
    ended = []
    for ns in namespaces():
        for pid in ip("netns", "pids", ns, check=False).stdout.split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
                ended.append(int(pid))
        ip("netns", "del", ns, check=False)
    ip("link", "del", BRIDGE, check=False)
    return ended


# The links of the shaped hosts, when they go through the wire (bench/soak/wire.py).
_wire: subprocess.Popen[str] | None = None
_wired: set[str] = set()
_wire_lock = threading.Lock()  # faults run in threads of their own


def setup(hosts: list[Host], shaped: tuple[Host, ...] = (), seed: int = 1) -> int | None:
    """The bridge and a namespace per host. The `shaped` hosts' links take delay
    and loss (`netem`): with tc netem where the kernel has it, else through the
    wire, a process of its own whose id is returned (None without one)."""
    ip("link", "add", BRIDGE, "type", "bridge")
    ip("addr", "add", f"{ROOT_IP}/24", "dev", BRIDGE)
    ip("link", "set", BRIDGE, "up")
    for h in hosts:
        ip("netns", "add", h.ns)
    wired = [h for h in shaped if h in hosts] if shaped and not has_netem(hosts[0]) else []
    if wired:
        _start_wire([h.name for h in wired], seed)
    for h in hosts:
        peer = f"skp-{h.name}"
        if h in wired:
            peer = f"skt-{h.name}"  # the wire's devices, made by it
        else:
            ip("link", "add", h.veth, "type", "veth", "peer", "name", peer)
        ip("link", "set", peer, "netns", h.ns)
        ip("link", "set", h.veth, "master", BRIDGE, "up")
        ip("-n", h.ns, "link", "set", "lo", "up")
        ip("-n", h.ns, "link", "set", peer, "name", "eth0")
        ip("-n", h.ns, "addr", "add", f"{h.ip}/24", "dev", "eth0")
        ip("-n", h.ns, "link", "set", "eth0", "up")
    return _wire.pid if _wire is not None else None


def has_netem(host: Host) -> bool:
    """Whether the kernel shapes with netem (tried on the host's loopback)."""
    tc = [*host.exec(), "tc", "qdisc"]
    added = (
        subprocess.run(
            [*tc, "add", "dev", "lo", "root", "netem", "delay", "1ms"],
            capture_output=True,
            check=False,
        ).returncode
        == 0
    )
    if added:
        subprocess.run([*tc, "del", "dev", "lo", "root"], capture_output=True, check=False)
    return added


def _start_wire(names: list[str], seed: int) -> None:
    global _wire
    _wire = subprocess.Popen(
        [sys.executable, "-m", "bench.soak.wire", "--seed", str(seed), *names],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert _wire.stdout is not None
    if (line := _wire.stdout.readline().strip()) != "ready":
        raise RuntimeError(f"soak: the wire did not start ({line or 'no answer'})")
    _wired.update(names)


def _tell_wire(line: str) -> None:
    assert _wire is not None and _wire.stdin is not None and _wire.stdout is not None
    with _wire_lock:
        _wire.stdin.write(line + "\n")
        _wire.stdin.flush()
        answer = _wire.stdout.readline().strip()
    if answer != "ok":
        raise RuntimeError(f"soak: the wire refused {line!r} ({answer or 'no answer'})")


def stop_wire() -> None:
    """End the wire (the shaped hosts' links go with it)."""
    global _wire
    if _wire is not None:
        with contextlib.suppress(Exception):
            _wire.kill()
            _wire.wait(10)
        _wire = None
        _wired.clear()


def link(host: Host, up: bool) -> None:
    """Cut (or restore) the host's only link."""
    ip("link", "set", host.veth, "up" if up else "down")


_NETEM = re.compile(r"delay (\d+)ms (\d+)ms loss (\d+(?:\.\d+)?)%")


def netem(host: Host, spec: str | None) -> str:
    """Delay and loss on the host's link (tc netem `spec`, as "delay 100ms 20ms
    loss 5%"), or none; what was applied."""
    if host.name in _wired:
        if spec is None:
            _tell_wire(f"{host.name} clear")
            return ""
        if (m := _NETEM.fullmatch(spec)) is None:
            raise ValueError(f"the wire cannot apply {spec!r}")
        _tell_wire(f"{host.name} {' '.join(m.groups())}")
        return f"wire {spec}"
    tc = [*host.exec(), "tc", "qdisc"]
    if spec is None:
        subprocess.run([*tc, "del", "dev", "eth0", "root"], capture_output=True, check=False)
        return ""
    subprocess.run(
        [*tc, "replace", "dev", "eth0", "root", "netem", *spec.split()],
        capture_output=True,
        check=True,
    )
    return f"netem {spec}"
