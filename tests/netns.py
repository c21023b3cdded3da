"""Separate hosts for the tests, on one machine: Linux network namespaces joined to one switch.

Each host is a network namespace with loopback up and an address of its own, joined by a veth pair to
a bridge that lives in a namespace of its own (the switch), so a host's network stack, ports and
routes are its own, as another machine's would be. Everything is made inside these namespaces (a veth
is created in the switch and its other end put straight into the host): the machine's own networking
is never touched, and deleting the namespaces removes every link.

Names carry the creating process's pid and a random part, so a leftover of a crashed run never
collides with a new one; ``sweep`` deletes the leftovers of runs whose process is gone.

The faults a test puts between hosts: a cable pulled (the switch's port down), packets lost (``tc
netem``, or where the kernel has no netem, the same drop in the switch's nftables bridge filter), a
host gone (its processes killed, its namespace deleted).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import secrets
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

PREFIX = "atlh"  # every namespace made here: atlh-<pid>-<random>-<role>
NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
T = TypeVar("T")


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {done.stderr.strip()}")
    return done


def unavailable() -> str | None:
    """Why hosts cannot be made here (None: they can), found by making a namespace and deleting it."""
    if os.geteuid() != 0:
        return "network namespaces need root (the tests of separate hosts run as root, as in CI)"
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2): `make netns` installs it"
    probe = f"{PREFIX}-{os.getpid()}-{secrets.token_hex(2)}-probe"
    made = ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"cannot make a network namespace here: {made.stderr.strip() or made.returncode}"
    try:
        entered = subprocess.run(["ip", "netns", "exec", probe, "true"], capture_output=True, text=True, timeout=30)
    finally:
        ip("netns", "del", probe, check=False)
    if entered.returncode != 0:
        return f"cannot enter a network namespace here: {entered.stderr.strip() or entered.returncode}"
    return None


def sweep() -> None:
    """Deletes the namespaces of earlier runs whose process is gone (a crash, a kill -9), with what runs in them."""
    listed = ip("netns", "list", check=False).stdout.split("\n")
    for name in (line.split()[0] for line in listed if line.startswith(PREFIX + "-")):
        pid = name.split("-")[1]
        if pid.isdigit() and not _alive(int(pid)):
            _kill_inside(name)
            ip("netns", "del", name, check=False)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_inside(namespace: str) -> None:
    """SIGKILLs every process in the namespace: what a host's sudden end does to them."""
    pids = ip("netns", "pids", namespace, check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


class Switch:
    """A bridge in a namespace of its own, and the hosts on it (``host``); ``close`` deletes them all."""

    def __init__(self, subnet: str = "10.77.0"):
        self.subnet = subnet
        self.run = f"{os.getpid()}-{secrets.token_hex(3)}"
        self.name = f"{PREFIX}-{self.run}-switch"
        self.hosts: dict[str, Host] = {}
        ip("netns", "add", self.name)
        try:
            ip("-n", self.name, "link", "set", "lo", "up")
            ip("-n", self.name, "link", "add", "br0", "type", "bridge")
            ip("-n", self.name, "link", "set", "br0", "up")
        except BaseException:
            self.close()
            raise

    def host(self, role: str, index: int) -> "Host":
        """A host named ``role`` (at most 13 characters: its switch port is p-<role>) at <subnet>.<index>."""
        host = Host(self, role, f"{PREFIX}-{self.run}-{role}", f"{self.subnet}.{index}")
        self.hosts[role] = host
        ip("netns", "add", host.name)
        ip("-n", host.name, "link", "set", "lo", "up")
        ip("-n", self.name, "link", "add", host.port, "type", "veth", "peer", "name", "eth0", "netns", host.name)
        ip("-n", self.name, "link", "set", host.port, "master", "br0")
        ip("-n", self.name, "link", "set", host.port, "up")
        ip("-n", host.name, "addr", "add", f"{host.address}/24", "dev", "eth0")
        ip("-n", host.name, "link", "set", "eth0", "up")
        return host

    def close(self) -> None:
        for host in list(self.hosts.values()):
            host.delete()
        ip("netns", "del", self.name, check=False)


class Host:
    """One namespace on the switch: the processes started in it, and the faults of its link."""

    def __init__(self, switch: Switch, role: str, name: str, address: str):
        self.switch, self.role, self.name, self.address = switch, role, name, address
        self.port = f"p-{role}"  # its end of the cable, in the switch
        self.processes: list[subprocess.Popen] = []
        self.deleted = False
        self._loss: str | None = None  # how loss was put on the link: "netem" or "nft"

    def start(self, argv: list[str], *, env: dict[str, str], log: Path, **popen: Any) -> subprocess.Popen:
        """``argv`` run on this host (``ip netns exec``), in a session of its own, stderr to ``log``."""
        with open(log, "ab") as stderr:
            process = subprocess.Popen(["ip", "netns", "exec", self.name, *argv], env=env, stderr=stderr,
                                       start_new_session=True, **popen)
        self.processes.append(process)
        return process

    def run(self, argv: list[str], *, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.name, *argv], env=env, capture_output=True, text=True,
                              timeout=timeout)

    def cable(self, connected: bool) -> None:
        """Plugs or pulls the host's cable: its port on the switch goes up or down; the host itself is left be."""
        ip("-n", self.switch.name, "link", "set", self.port, "up" if connected else "down")

    def lose(self, percent: int) -> None:
        """Drops ``percent`` % of the packets each way on the host's link: ``tc netem`` on both ends of the
        cable, or, where the kernel has no netem, the same in the switch's bridge filter (nftables)."""
        netem = ["qdisc", "add", "dev", "{dev}", "root", "netem", "loss", f"{percent}%"]
        ends = [(self.name, "eth0"), (self.switch.name, self.port)]
        if shutil.which("tc") is not None and all(
                subprocess.run(["tc", "-n", ns, *(a.format(dev=dev) for a in netem)], capture_output=True,
                               timeout=30).returncode == 0 for ns, dev in ends):
            self._loss = "netem"
            return
        for ns, dev in ends:  # netem may have taken on one end
            subprocess.run(["tc", "-n", ns, "qdisc", "del", "dev", dev, "root"], capture_output=True, timeout=30)
        if shutil.which("nft") is None:
            raise LossUnavailable("neither tc netem (sch_netem) nor nftables (nft) is here: `make netns` installs "
                                  "iproute2 and nftables")
        table = (f"table bridge loss_{self.role} {{\n chain forward {{\n"
                 "  type filter hook forward priority 0; policy accept;\n"
                 f'  iifname "{self.port}" numgen random mod 100 < {percent} drop\n'
                 f'  oifname "{self.port}" numgen random mod 100 < {percent} drop\n }}\n}}\n')
        done = subprocess.run(["ip", "netns", "exec", self.switch.name, "nft", "-f", "-"], input=table,
                              capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            raise LossUnavailable(f"neither tc netem nor an nftables bridge filter works here: {done.stderr.strip()}")
        self._loss = "nft"

    def lossless(self) -> None:
        if self._loss == "netem":
            for ns, dev in ((self.name, "eth0"), (self.switch.name, self.port)):
                subprocess.run(["tc", "-n", ns, "qdisc", "del", "dev", dev, "root"], capture_output=True, timeout=30)
        elif self._loss == "nft":
            subprocess.run(["ip", "netns", "exec", self.switch.name, "nft", "delete", "table", "bridge",
                            f"loss_{self.role}"], capture_output=True, timeout=30)
        self._loss = None

    def firewall(self, allowed: dict[int, list[str]]) -> bool:
        """Lets in only TCP to each port from its addresses (and the answers to this host's own connections),
        as a host's firewall would; False where there is no nftables to do it with."""
        if shutil.which("nft") is None:
            return False
        rules = "".join(f"  tcp dport {port} ip saddr {{ {', '.join(sources)} }} accept\n"
                        for port, sources in allowed.items())
        table = ("table inet firewall {\n chain input {\n  type filter hook input priority 0; policy drop;\n"
                 f"  iif lo accept\n  ct state established,related accept\n{rules} }}\n}}\n")
        done = subprocess.run(["ip", "netns", "exec", self.name, "nft", "-f", "-"], input=table, capture_output=True,
                              text=True, timeout=30)
        if done.returncode != 0:
            raise RuntimeError(f"nft refused the firewall of {self.name}: {done.stderr.strip()}")
        return True

    def tcp_resent(self) -> int:
        """The TCP segments this host has sent again (its /proc/net/snmp RetransSegs): what loss costs it."""
        table = [line.split() for line in self.run(["cat", "/proc/net/snmp"], env={}).stdout.splitlines()
                 if line.startswith("Tcp:")]
        return int(table[1][table[0].index("RetransSegs")])

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM to each process started here (each stops its children), SIGKILL to what is left."""
        for process in self.processes:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for process in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(max(0.1, deadline - time.monotonic()))
        self.kill()

    def kill(self) -> None:
        """What a host's sudden end does: every process on it SIGKILLed, at once."""
        if not self.deleted:
            _kill_inside(self.name)
        for process in self.processes:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
        for process in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(10)

    def delete(self) -> None:
        """The host is gone: its processes killed, its namespace (and with it its cable) deleted."""
        self.kill()
        if not self.deleted:
            ip("netns", "del", self.name, check=False)
            self.deleted = True


class LossUnavailable(RuntimeError):
    """Packet loss cannot be put on a link here (no netem in the kernel, no nftables)."""


class HostLoop:
    """An asyncio loop in a thread of this process that lives in a host's network namespace: the sockets
    made on it (ZeroMQ's I/O threads start from it) are that host's, so a client in the test is a client
    on that host."""

    def __init__(self, host: Host):
        self.host = host
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._serve, name=f"host-{host.role}", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError(f"the loop on {host.name} did not start")
        if self._error is not None:
            raise self._error

    def _serve(self) -> None:
        try:
            fd = os.open(NETNS_DIR / self.host.name, os.O_RDONLY)
            try:
                if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns into {self.host.name}")
            finally:
                os.close(fd)
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        asyncio.set_event_loop(self.loop)
        self._ready.set()
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        """Runs ``coro`` on the host's loop and returns its result; TimeoutError after ``timeout`` seconds."""
        future = asyncio.run_coroutine_threadsafe(asyncio.wait_for(coro, timeout), self.loop)
        return future.result(timeout + 5)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self.loop.close()


@contextlib.contextmanager
def switch(subnet: str = "10.77.0") -> Iterator[Switch]:
    """A switch whose hosts are all deleted on the way out, however the block ends."""
    sweep()
    made = Switch(subnet)
    try:
        yield made
    finally:
        made.close()
