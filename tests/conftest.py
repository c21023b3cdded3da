"""Shared fixtures: a real atelier (``atelier up`` as a subprocess) on loopback ports chosen by the OS."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

ROOT = Path(__file__).resolve().parent.parent
READY = "ATELIER-READY "

# Nothing in the tests may reach for a model hub.
os.environ["HF_HUB_OFFLINE"] = "1"
# One thread of torch's per process: the suite runs two workers on two cores, each with ateliers of its own
# beside it, and torch's OpenMP threads spin-wait for each other when more of them run than there are cores
# (a test of seconds took a minute beside another worker's). Set before torch is imported; the ateliers the
# tests start inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def children_named(root: int, module: bytes):
    """The processes under ``root`` that run ``module`` (``python -m <module>``)."""
    for pid in descendants(root):
        try:
            if module in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"):
                yield pid
        except OSError:  # gone since it was listed
            continue


@contextlib.contextmanager
def broker_thread(**settings) -> Iterator[tuple["Broker", threading.Thread]]:  # noqa: F821
    """A broker on loopback ports chosen by the OS, serving in a thread of this process; stopped
    (and waited for, up to 30 s) on the way out."""
    from broker import Broker

    b = Broker("tcp://127.0.0.1:0", "tcp://127.0.0.1:0", **settings)
    thread = threading.Thread(target=b.serve, daemon=True)
    thread.start()
    try:
        yield b, thread
    finally:
        b.stop()
        thread.join(30)


T = TypeVar("T")


def _settled(value, deadline: float, predicate) -> bool:
    """Whether polling ends: on a truthy value, or with an AssertionError past the deadline."""
    if value:
        return True
    if time.monotonic() >= deadline:
        raise AssertionError(f"not seen in time: {predicate!r} last gave {value!r}")
    return False


def eventually(predicate: Callable[[], T], timeout: float = 30.0, interval: float = 0.05,
               ignoring: tuple[type[BaseException], ...] = ()) -> T:
    """``predicate()``'s first truthy value, asked every ``interval`` seconds; AssertionError after
    ``timeout``. The exceptions in ``ignoring`` mean "not yet" (a process still starting)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except ignoring:
            value = None
        if _settled(value, deadline, predicate):
            return value
        time.sleep(interval)


async def eventually_async(predicate: Callable[[], Awaitable[T]], timeout: float = 30.0, interval: float = 0.05,
                           ignoring: tuple[type[BaseException], ...] = ()) -> T:
    """``eventually`` for a coroutine function, sleeping without blocking the event loop."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = await predicate()
        except ignoring:
            value = None
        if _settled(value, deadline, predicate):
            return value
        await asyncio.sleep(interval)


def run(coro, timeout: float = 120.0):
    """Runs a coroutine to completion with a hard timeout (every await in a test is bounded)."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


class Cluster:
    """``atelier up`` in a subprocess; knows its endpoints once it has said it is ready."""

    def __init__(self, home: Path, config: Path | None = None):
        self.home = home
        self.config = config
        self.router = ""
        self.pub = ""
        self.http = ""  # the HTTP API's base URL
        self.process: subprocess.Popen | None = None
        self.log = home / f"up-{time.monotonic_ns()}.log"

    def env(self) -> dict[str, str]:
        return {**os.environ, "ATELIER_HOME": str(self.home), "PYTHONPATH": str(ROOT)}

    def start(self, timeout: float = 120.0) -> "Cluster":
        # Clusters of a test session share one home (the tiny models are made once), so each keeps
        # its own journal: one scheduler holds a journal at a time.
        self.journal = self.home / f"journal-{time.monotonic_ns()}.sqlite3"
        argv = [sys.executable, "-m", "frontends.cli", "up", "--router", "tcp://127.0.0.1:0",
                "--pub", "tcp://127.0.0.1:0", "--http", "127.0.0.1:0", "--journal", str(self.journal)]
        if self.config is not None:
            argv += ["--config", str(self.config)]
        self._stderr = open(self.log, "wb")
        self.process = subprocess.Popen(argv, cwd=ROOT, env=self.env(), stdout=subprocess.PIPE,
                                        stderr=self._stderr, text=True)
        deadline = time.monotonic() + timeout
        assert self.process.stdout is not None
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError(f"atelier up exited early:\n{self.log.read_text()[-4000:]}")
            if line.startswith(READY):
                info = json.loads(line[len(READY):])
                self.router, self.pub, self.http = info["router"], info["pub"], info.get("http") or ""
                return self
        raise RuntimeError("atelier up did not get ready in time")

    def pid_of(self, module: bytes) -> int:
        """The pid of the part of this atelier that runs ``module``; LookupError when none does (now)."""
        assert self.process is not None
        for pid in children_named(self.process.pid, module):
            return pid
        raise LookupError(module)

    def client(self):
        from frontends.client import AtelierClient

        return AtelierClient(self.router, self.pub)

    def cli(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        argv = [sys.executable, "-m", "frontends.cli", args[0], "--router", self.router, "--pub", self.pub,
                *args[1:]]
        if self.config is not None:
            argv += ["--config", str(self.config)]
        return subprocess.run(argv, cwd=ROOT, env=self.env(), capture_output=True, text=True, timeout=timeout)

    def stop(self, timeout: float = 30.0) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGINT)
        try:
            return self.process.wait(timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
            self._stderr.close()


# What the first test on the shared atelier also waits for: its catalog's files being made and it starting,
# the work that each module's own atelier did in its first test before.
SHARED_START_S = 300


# The files that take longest, started first: `make test` runs the suite on two workers (pytest-xdist,
# whole files each), and a long file left for last would run alone at the end.
LONGEST_FIRST = ("test_gang.py", "test_gpu_check.py", "test_hosts.py", "test_fleet_bench.py", "test_discord.py",
                 "test_system.py", "test_training_system.py", "test_security_wire.py", "test_web.py",
                 "test_security_clients.py", "test_fuzz_http.py", "test_admin_web.py", "test_fuzz_wire.py",
                 "test_leases_system.py", "test_operator_system.py", "test_store.py", "test_cli_errors.py",
                 "test_lifecycle.py", "test_parallel.py", "test_curve.py", "test_http.py", "test_security_http.py",
                 "test_watchdog.py", "test_journal.py", "test_events.py", "test_video.py", "test_training.py")


def pytest_configure(config: pytest.Config) -> None:
    # pytest-xdist (3.6 on) reorders --dist loadfile's files by their number of tests, most first, unless told
    # not to: that put test_gpu_check.py (three tests, the longest file) last, alone on one worker.
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its order
    # Each file's first test on the shared atelier may be the one that starts it (on a worker, whichever
    # file comes first there does).
    seen: set[Path] = set()
    for item in items:
        if "shared_cluster" not in item.fixturenames or item.path in seen:
            continue
        seen.add(item.path)
        marker = item.get_closest_marker("timeout")
        bound = float(marker.args[0] if marker and marker.args else item.config.getini("timeout"))
        item.add_marker(pytest.mark.timeout(bound + SHARED_START_S), append=False)


@pytest.fixture(scope="session")
def atelier_home(tmp_path_factory) -> Path:
    """One home for the whole session, so the tiny models are generated once."""
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def cluster(atelier_home, tmp_path_factory):
    """A running atelier with the built-in models plus a deliberately broken one."""
    from atelier.tiny_models import build_tiny_sd

    folder = tmp_path_factory.mktemp("catalog")
    broken = build_tiny_sd(folder / "broken-sd", text_max_positions=8)
    truncated = build_tiny_sd(folder / "truncated-sd")
    weights = truncated / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    config = folder / "atelier.toml"
    small = "default_width = 64\ndefault_height = 64\ndefault_steps = 2\n"
    config.write_text(f'builtin_models = true\n[models.broken-sd]\nfamily = "sd1"\nsource = "{broken}"\n{small}'
                      f'[models.truncated-sd]\nfamily = "sd1"\nsource = "{truncated}"\n{small}'
                      f'[models.missing-sd]\nfamily = "sd1"\nsource = "{folder / "nowhere"}"\n{small}')
    c = Cluster(atelier_home, config).start()
    yield c
    c.stop()


@pytest.fixture(scope="session")
def lora_files(atelier_home, tmp_path_factory) -> dict[str, Path]:
    """The shared atelier's lora-sd: the tiny SD and two LoRAs (ink, moss)."""
    from tests import catalog

    return catalog.lora_files(atelier_home, tmp_path_factory.mktemp("loras"))


@pytest.fixture(scope="session")
def vae_files(atelier_home, tmp_path_factory) -> dict[str, Path]:
    """The shared atelier's styled-sd, fp16-sd, no-fp16-sd and misfit-sd: VAEs, an fp16 variant, TAESDs."""
    from tests import catalog

    return catalog.vae_files(atelier_home, tmp_path_factory.mktemp("vaes"))


@pytest.fixture(scope="session")
def single_sd_files(atelier_home, tmp_path_factory) -> tuple[Path, Path, Path]:
    """The shared atelier's single-sd: (the tiny SD's folder, it as one file, a folder of its configs)."""
    from atelier.tiny_models import ensure_builtin
    from tests import catalog

    return catalog.single_file(tmp_path_factory.mktemp("single-sd"), ensure_builtin("tiny-sd", atelier_home / "models"),
                               "sd1")


@pytest.fixture(scope="session")
def shared_cluster(atelier_home, lora_files, vae_files, single_sd_files, tmp_path_factory):
    """One atelier for the whole session: the built-in catalog (a tiny model of every family) and the
    entries of tests/catalog.py. Tests that run jobs on it and neither stop its processes nor need
    settings of their own use it rather than starting an atelier each; they run on their own jobs,
    users and models, never on what the others left."""
    from atelier.tiny_models import ensure_builtin
    from tests import catalog

    ensure_builtin("tiny-pixart-alpha", atelier_home / "models")  # named by its path in the catalog
    folder = tmp_path_factory.mktemp("shared-catalog")
    config = folder / "atelier.toml"
    config.write_text(catalog.shared_catalog(atelier_home, folder, loras=lora_files, vaes=vae_files,
                                             single_sd=single_sd_files))
    c = Cluster(atelier_home, config).start()
    yield c
    c.stop()


class HttpFrontend:
    """A second HTTP server (``python -m frontends.http``), with tokens, on a running atelier: what an
    operator runs to serve the compatible APIs to others, and cheaper for a test than an atelier of its own."""

    # token -> (user, settings): users named for these tests alone, as the shared atelier's users are.
    TOKENS = {"compat-ana-0123456789abcdef": ("compat-ana", ""),
              "compat-ben-0123456789abcdef": ("compat-ben", ""),
              "compat-slow-0123456789abcdef": ("compat-slow", "rate_per_minute = 2\n"),
              "compat-admin-0123456789abcdef": ("compat-admin", 'role = "admin"\n'),
              "compat-web-0123456789abcdef": ("compat-web", "")}  # test_web's page, whose jobs are its own

    def __init__(self, cluster: Cluster, folder: Path):
        self.cluster = cluster
        self.config = folder / "atelier.toml"
        tokens = "".join(f'[[http.tokens]]\ntoken = "{token}"\nuser = "{user}"\n{extra}'
                         for token, (user, extra) in self.TOKENS.items())
        assert cluster.config is not None
        self.config.write_text(cluster.config.read_text() + "\n" + tokens)
        self.log = folder / "http.log"
        self._stderr = open(self.log, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "frontends.http", "--config", str(self.config), "--router", cluster.router,
             "--pub", cluster.pub, "--listen", "127.0.0.1:0"],
            cwd=ROOT, env=cluster.env(), stdout=subprocess.PIPE, stderr=self._stderr, text=True)
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.startswith(READY):
            raise RuntimeError(f"the HTTP server did not start:\n{self.log.read_text()[-4000:]}")
        self.url = json.loads(line[len(READY):])["url"]

    def token(self, user: str) -> str:
        return next(token for token, (name, _) in self.TOKENS.items() if name == f"compat-{user}")

    def auth(self, user: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(user)}"}

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(30)
        finally:
            if self.process.poll() is None:
                self.process.kill()
            self._stderr.close()


@pytest.fixture(scope="session")
def compat_http(shared_cluster, tmp_path_factory):
    """The shared atelier's models behind an HTTP server with tokens (``HttpFrontend.TOKENS``): the
    compatible APIs' tests call it with each ecosystem's own client library."""
    frontend = HttpFrontend(shared_cluster, tmp_path_factory.mktemp("compat-http"))
    yield frontend
    frontend.stop()


@pytest.fixture(scope="session")
def tiny_model(atelier_home):
    """``get(name)``: a built-in tiny model loaded on the CPU once for the session, as (its family,
    the loaded model, its folder), from the session's model cache (the cluster's too, so each is built
    once). Tests only run these models; one that needs other load options loads its own."""
    from atelier.families import get_family
    from atelier.families.loaded import LoadRequest
    from atelier.tiny_models import BUILTIN, ensure_builtin

    loaded: dict[str, tuple] = {}

    def get(name: str) -> tuple:
        if name not in loaded:
            path = ensure_builtin(name, atelier_home / "models")
            family = get_family(BUILTIN[name])
            loaded[name] = family, family.load(LoadRequest(path, device="cpu")), path
        return loaded[name]

    return get
