"""A GPU node: starts and supervises this host's loader and one runner per device.

With no GPU it runs one runner on the CPU. A dead child is restarted with
backoff; children get SIGTERM if the node itself dies, so none is orphaned.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
import sys

from atelier.config import Config, load_config
from atelier.supervisor import ChildSpec, Supervisor

log = logging.getLogger("atelier.node")


def detect_devices() -> list[str]:
    try:
        import torch
    except ImportError:
        return ["cpu"]
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [f"cuda:{i}" for i in range(count)] or ["cpu"]


def child_specs(config: Config, *, router: str, node: str, devices: list[str],
                config_path: str | None, log_level: str) -> list[ChildSpec]:
    common = ["--router", router, "--node", node, "--log-level", log_level]
    if config_path:
        common += ["--config", config_path]
    specs = [ChildSpec(f"loader-{node}", [sys.executable, "-m", "actors.loader", *common])]
    for device in devices:
        specs.append(ChildSpec(f"runner-{device}",
                               [sys.executable, "-m", "actors.runner", *common, "--device", device]))
    return specs


async def serve(specs: list[ChildSpec]) -> None:
    supervisor = Supervisor()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    for spec in specs:
        await supervisor.start(spec)
    await stop.wait()
    # Runners first: they hand their jobs back while the loader is still there.
    await supervisor.stop(order=[s.name for s in specs if s.name.startswith("runner-")])


def main(argv: list[str] | None = None) -> int:
    from atelier.runtime import run, setup_logging

    parser = argparse.ArgumentParser(prog="atelier node", description="Run a node: its loader and runners.")
    parser.add_argument("--config")
    parser.add_argument("--router", help="the broker's ROUTER endpoint, e.g. tcp://HOST:5555")
    parser.add_argument("--node", help="this node's name (default: the host name)")
    parser.add_argument("--devices", help="comma-separated, e.g. cuda:0,cuda:1 or cpu (default: all GPUs, else cpu)")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    setup_logging(args.log_level, "node")
    config = load_config(args.config)
    node = args.node or config.node.name or socket.gethostname()
    devices = args.devices.split(",") if args.devices else (config.node.devices or detect_devices())
    specs = child_specs(config, router=args.router or config.broker.router, node=node, devices=devices,
                        config_path=args.config, log_level=args.log_level)
    log.info("node %s: devices %s", node, ", ".join(devices))
    run(serve(specs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
