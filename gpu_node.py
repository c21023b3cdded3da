"""A GPU node: starts and supervises this host's loader, one runner per device, and one gang per
``[node] gangs`` entry (its ranks' processes, restarted together).

With no GPU it runs one runner on the CPU; ``[node] devices = []`` runs no single-device runner (a node
of gangs alone). A dead child is restarted with backoff; children get SIGTERM if the node itself dies,
so none is orphaned.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys

from atelier import topology
from atelier.config import Config
from atelier.runtime import process_main, process_parser
from atelier.supervisor import Supervisor

log = logging.getLogger("atelier.node")


# What a GPU driver leaves on a host (NVIDIA's; AMD's ROCm, which torch.cuda also serves; WSL2's GPU
# bridge). Where none is there, torch.cuda finds no device either, and importing torch only to learn that
# costs a node seconds of its start (more on a busy CPU) before its runners start.
GPU_DRIVER_PATHS = ("/proc/driver/nvidia", "/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg")


def detect_devices() -> list[str]:
    if not any(os.path.exists(path) for path in GPU_DRIVER_PATHS):
        return ["cpu"]
    try:
        import torch
    except ImportError:
        return ["cpu"]
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [f"cuda:{i}" for i in range(count)] or ["cpu"]


async def serve(args: argparse.Namespace, config: Config, stop: asyncio.Event) -> None:
    node = args.node or config.node.name or socket.gethostname()
    devices = args.devices.split(",") if args.devices else (
        config.node.devices if config.node.devices is not None else detect_devices())
    gangs = config.node.gangs
    log.info("node %s: devices %s%s", node, ", ".join(devices) or "none",
             "".join(f"; gang {'+'.join(gang)}" for gang in gangs))
    place = topology.Place(router=args.router or config.broker.router, node=node, devices=devices,
                           config_path=args.config, log_level=args.log_level, gangs=gangs)
    supervisor = Supervisor()
    try:
        await topology.start(supervisor, topology.NODE, place)
        await topology.start_gangs(supervisor, place)
        await stop.wait()
    finally:
        await supervisor.stop()


def main(argv: list[str] | None = None) -> int:
    parser = process_parser("atelier node", "Run a node: its loader and runners.",
                            router="the broker's ROUTER endpoint, e.g. tcp://HOST:5555")
    parser.add_argument("--node", help="this node's name (default: the host name)")
    parser.add_argument("--devices", help="comma-separated, e.g. cuda:0,cuda:1 or cpu (default: all GPUs, else cpu)")
    return process_main(parser, serve, argv, log_name="node")


if __name__ == "__main__":
    sys.exit(main())
