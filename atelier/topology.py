"""Which processes make up an atelier, in one table: what ``atelier up`` starts on one machine, and
what a node starts.

    atelier up ─┬─ broker
                ├─ scheduler
                ├─ node ─┬─ loader
                │        ├─ runner, one per device
                │        └─ gang, one per [node] gangs entry: rank 1 … N-1 (actors.gang_rank), then
                │           rank 0, the runner of them all (actors.runner --device cuda:0+cuda:1 …)
                └─ http (unless turned off)

Both start their parts in this order (each part needs the ones before it: the broker's bound
endpoints, the loader's staged weights) and a Supervisor stops them in the reverse order. A gang's
processes are one group: when one exits, the node stops the others and starts them all again.
"""

from __future__ import annotations

import json
import socket
import sys
from dataclasses import dataclass, field
from typing import Callable

from atelier.supervisor import ChildSpec, Supervisor


@dataclass
class Place:
    """What the parts of one tree are told; a part that binds (port 0 asks the OS) fills in where it did."""

    router: str
    pub: str = ""
    config_path: str | None = None
    log_level: str = "INFO"
    journal: str | None = None  # the scheduler's, in place of the config's
    devices: list[str] = field(default_factory=list)  # up: passed to the node (none: it finds them)
    listen: str | None = None  # the HTTP server's HOST:PORT; None: no HTTP server
    http_url: str | None = None  # where the HTTP server said it serves
    node: str = ""  # a node's name, for its loader and runners
    gangs: list[list[str]] = field(default_factory=list)  # a node's: each gang's devices, in rank order


@dataclass(frozen=True)
class Part:
    name: str  # the child's name; {node} and {device} are filled in
    module: str  # run as ``python -m module``
    options: Callable[[Place, str], list[str]]  # (place, device) -> its command-line options
    # A part that binds prints READY_PREFIX and JSON once it has; ``bound`` reads where into the place.
    bound: Callable[[Place, dict], None] | None = None
    per_device: bool = False
    wanted: Callable[[Place], bool] = lambda place: True


def _broker_bound(place: Place, said: dict) -> None:
    place.router, place.pub = said["router"], said["pub"]


def _http_bound(place: Place, said: dict) -> None:
    place.http_url = said["url"]
    assert place.listen is not None
    place.listen = f"{place.listen.rpartition(':')[0]}:{said['url'].rpartition(':')[2]}"


def _node_options(place: Place, device: str) -> list[str]:
    return ["--router", place.router, "--node", place.node]


UP: list[Part] = [
    Part("broker", "broker", lambda p, _: ["--router", p.router, "--pub", p.pub], bound=_broker_bound),
    Part("scheduler", "actors.scheduler",
         lambda p, _: ["--router", p.router, *(["--journal", p.journal] if p.journal else [])]),
    Part("node", "gpu_node",
         lambda p, _: ["--router", p.router, *(["--devices", ",".join(p.devices)] if p.devices else [])]),
    Part("http", "frontends.http", lambda p, _: ["--router", p.router, "--pub", p.pub, "--listen", p.listen or ""],
         bound=_http_bound, wanted=lambda p: p.listen is not None),
]
NODE: list[Part] = [
    Part("loader-{node}", "actors.loader", _node_options),
    Part("runner-{device}", "actors.runner", lambda p, device: [*_node_options(p, device), "--device", device],
         per_device=True),
]


def _common(place: Place) -> list[str]:
    return ["--log-level", place.log_level, *(["--config", place.config_path] if place.config_path else [])]


def specs(part: Part, place: Place) -> list[ChildSpec]:
    common = _common(place)
    return [ChildSpec(part.name.format(node=place.node, device=device),
                      [sys.executable, "-m", part.module, *part.options(place, device), *common],
                      wait_ready=part.bound is not None)
            for device in (place.devices if part.per_device else [""])]


async def start(supervisor: Supervisor, parts: list[Part], place: Place) -> None:
    """Starts ``parts`` in order under ``supervisor``; ``place`` learns where the binding ones bound."""
    for part in parts:
        if not part.wanted(place):
            continue
        for spec in specs(part, place):
            child = await supervisor.start(spec)
            if part.bound is not None:
                part.bound(place, json.loads(child.ready_line or "{}"))
                # A restart must come back where the others look for it (matters with port 0).
                child.spec.argv = specs(part, place)[0].argv


def free_port() -> int:
    """A loopback port free now (the OS's choice), for a gang's process group to form on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def gang_specs(place: Place, devices: list[str], port: int) -> list[ChildSpec]:
    """A gang's processes, in the order they start: ranks 1 … N-1, then rank 0 (the runner), which a stop
    reaches first, so it hands its batch back while the other ranks still answer."""
    joined, world = "+".join(devices), str(len(devices))
    gang = ["--world", world, "--port", str(port), *_common(place)]
    others = [ChildSpec(f"runner-{joined}-rank{rank}",
                        [sys.executable, "-m", "actors.gang_rank", "--node", place.node, "--gang", joined,
                         "--rank", str(rank), *gang])
              for rank in range(1, len(devices))]
    leader = ChildSpec(f"runner-{joined}", [sys.executable, "-m", "actors.runner", *_node_options(place, joined),
                                            "--device", joined, "--rank", "0", *gang])
    return [*others, leader]


async def start_gangs(supervisor: Supervisor, place: Place) -> None:
    """Starts each of ``place.gangs`` as a group of the supervisor, on a fresh port at every start."""
    for devices in place.gangs:
        await supervisor.start_group(f"gang {'+'.join(devices)}",
                                     lambda devices=devices: gang_specs(place, devices, free_port()))
