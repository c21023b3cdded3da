"""Issue 13, the wire: who may register as what, who may command whom, the private default socket,
CURVE's rough edges, frame limits, re-registration jitter, error texts and stray files in /dev/shm.
Each test performs the attack through the real interface (a raw ZeroMQ peer, a file in /dev/shm) and
checks the legitimate use still works."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import zmq
import zmq.asyncio

import broker as broker_module
from actors import codec, keys
from actors.actor import Actor, RemoteError, handles
from actors.codec import MAGIC, Envelope
from actors.messages import (
    BatchItem,
    Error,
    GetStatus,
    Hello,
    LoaderState,
    Preload,
    Release,
    Role,
    RunBatch,
    Stage,
    Staged,
    StopJob,
    Welcome,
)
from atelier import staging
from atelier.config import Config
from atelier.jobs import Capabilities, ErrorCode, JobSpec, JobState
from atelier.runtime import Failure
from tests.conftest import ROOT, broker_thread, run

pytestmark = pytest.mark.timeout(300)

NOBODY = 65534


def _dealer(ctx: zmq.Context, endpoint: str) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 10_000)
    sock.connect(endpoint)
    return sock


def _ask(sock: zmq.Socket, src: str, dst: str, msg, msg_id: int = 1) -> Envelope:
    """Sends ``msg`` and returns the first reply to it (heartbeats and unasked messages skipped)."""
    sock.send_multipart(codec.encode(Envelope(msg, src, dst, msg_id)))
    while True:
        env = codec.decode(sock.recv_multipart())
        if env.corr == msg_id:
            return env


def _hello(sock: zmq.Socket, name: str, role: Role, **capabilities) -> Envelope:
    return _ask(sock, name, "broker", Hello(role=role, incarnation=uuid.uuid4().hex,
                                            capabilities=Capabilities(pid=os.getpid(), **capabilities)))


def _forbidden(env: Envelope) -> str:
    assert isinstance(env.msg, Error) and env.msg.code is ErrorCode.forbidden, env.msg
    return env.msg.message


def _noop(prompt: str) -> JobSpec:
    return JobSpec(model="noop", prompt=prompt, steps=1, previews=False, user=f"sec-{uuid.uuid4().hex[:6]}")


# --------------------------------------------------------------------------- #
# H3 (c) and the takeover of live names, without CURVE


def test_h3_impostors_and_commands_from_the_wrong_peer_are_refused(shared_cluster):
    """A raw peer on the broker (no CURVE: tcp loopback, as the shared atelier is told) tries to take
    the live scheduler's, loader's and runner's names, a runner's name as a frontend, and to command
    the runner, the loader and the scheduler as a frontend. Every attempt is refused with forbidden;
    the real atelier keeps serving."""

    async def cluster_status():
        async with shared_cluster.client() as client:
            return await client.status()

    status = run(cluster_status())
    runner = status.runners[0]
    node = runner.capabilities.node
    ctx = zmq.Context()
    try:
        refusals = {}
        for name, role, extra in [("scheduler", Role.scheduler, {}),
                                  (f"loader-{node}", Role.loader, {"node": node}),
                                  (runner.name, Role.runner, {"node": node, "resident": {"noop": 0, "tiny-sd": 0}})]:
            impostor = _dealer(ctx, shared_cluster.router)
            refusals[name] = _forbidden(_hello(impostor, name, role, **extra))
            impostor.close()
        assert all("in use by a connected peer" in why for why in refusals.values()), refusals
        squatter = _dealer(ctx, shared_cluster.router)
        assert "a runner's name" in _forbidden(_hello(squatter, f"runner-{node}-ghost", Role.frontend))
        squatter.close()

        mallory = f"mallory-{uuid.uuid4().hex[:6]}"
        peer = _dealer(ctx, shared_cluster.router)
        assert isinstance(_hello(peer, mallory, Role.frontend).msg, Welcome)
        item = BatchItem(job=JobSpec(model="noop", prompt="stolen gpu", steps=1, width=64, height=64, seed=1,
                                     guidance=1.0), attempt=1)
        commands = [(runner.name, RunBatch(batch_id=uuid.uuid4().hex, items=[item])),
                    (runner.name, StopJob(job_id=uuid.uuid4().hex, reason="someone else's")),
                    (f"loader-{node}", Stage(model="noop")),
                    (f"loader-{node}", Preload(models=["tiny-sd"])),
                    (f"loader-{node}", Release(model="noop")),
                    ("scheduler", LoaderState(node=node, budget_bytes=1, staged={"tiny-sd": 1}))]
        for i, (dst, command) in enumerate(commands, 10):
            why = _forbidden(_ask(peer, mallory, dst, command, msg_id=i))
            assert command.kind in why, why
        peer.close()
    finally:
        ctx.destroy(linger=0)

    async def still_serving():
        async with shared_cluster.client() as client:
            result = await client.generate(_noop("after the impostors"), timeout=60)
            return result, await client.status()

    result, after = run(still_serving())
    assert result.job.state is JobState.done
    assert {r.name for r in after.runners} == {r.name for r in status.runners}  # no phantom runner joined
    log = shared_cluster.log.read_text(errors="replace")
    assert "refused 'scheduler' as scheduler" in log and "only the scheduler sends it" in log


def test_h3_a_restarted_peer_gets_its_name_back_once_the_old_connection_is_gone():
    """The legitimate takeover: a peer's process dies and a new one (new incarnation) says Hello with
    the same name; the broker lets it in at once, and a takeover by a second live process is refused."""
    ctx = zmq.Context()
    try:
        with broker_thread(heartbeat_s=5.0) as (b, _):
            first = _dealer(ctx, b.router_endpoint)
            assert isinstance(_hello(first, "scheduler", Role.scheduler).msg, Welcome)
            second = _dealer(ctx, b.router_endpoint)
            assert "in use" in _forbidden(_hello(second, "scheduler", Role.scheduler))
            first.close()  # the old process is gone: its connection closes
            time.sleep(0.2)
            assert isinstance(_hello(second, "scheduler", Role.scheduler).msg, Welcome)
            assert set(b.names) == {"scheduler"} and len(b.peers) == 1
            second.close()
    finally:
        ctx.destroy(linger=0)


# --------------------------------------------------------------------------- #
# H3 (a), L3: CURVE keys bound to names and roles


def _curve_config(folder: Path, pair: str = "peer") -> Config:
    return Config.model_validate({"home": str(folder), "broker": {"curve": True, "keys": str(folder / "keys"),
                                                                  "peer_key": pair}})


def _peer(role: Role, name: str, router: str, config: Config, heartbeat_s: float = 5.0) -> Actor:
    return type("Peer", (Actor,), {"role": role})(name, router, heartbeat_s=heartbeat_s, keys=keys.for_peer(config))


async def _joins(role: Role, name: str, router: str, config: Config, heartbeat_s: float = 5.0) -> str:
    """"joined", or why not. A Hello is asked for twice ``heartbeat_s``: a key the broker does not know gets
    no answer at all (CURVE drops the connection), so that is what such a join waits."""
    peer = _peer(role, name, router, config, heartbeat_s)
    try:
        await peer.start(timeout=0.5)
    except Failure as exc:
        return str(exc)
    await peer.close(drain_timeout=0)
    return "joined"


def test_h3_curve_keys_are_bound_to_names_and_roles(tmp_path, monkeypatch, caplog):
    """A frontend's key cannot register as a runner or the scheduler; a node's key is its own node's
    loader and runners, no other's; the scheduler's key is the scheduler. A malformed key file is
    refused loudly and the rest still reload; a key taken out drops its live peer."""
    caplog.set_level(logging.INFO, logger="atelier.broker")
    folder = tmp_path / "keys"
    keys.make(folder, "sched", role="scheduler")
    keys.make(folder, "web", role="frontend")
    keys.make(folder, "gpu1", role="node")
    monkeypatch.setattr(broker_module, "KEYS_RELOAD_S", 0.2)
    config = {pair: _curve_config(tmp_path, pair) for pair in ("sched", "web", "gpu1")}
    broker_keys = keys.for_broker(config["web"])

    async def go(router: str) -> dict[str, str]:
        cases = {"web as runner": ("web", Role.runner, "runner-gpu1-cpu"),
                 "web as scheduler": ("web", Role.scheduler, "scheduler"),
                 "web as frontend named scheduler": ("web", Role.frontend, "scheduler"),
                 "web as frontend": ("web", Role.frontend, "http-1234"),
                 "gpu1 as its runner": ("gpu1", Role.runner, "runner-gpu1-cpu"),
                 "gpu1 as its loader": ("gpu1", Role.loader, "loader-gpu1"),
                 "gpu1 as another node's runner": ("gpu1", Role.runner, "runner-gpu2-cpu"),
                 "gpu1 as scheduler": ("gpu1", Role.scheduler, "scheduler"),
                 "sched as scheduler": ("sched", Role.scheduler, "scheduler")}
        return {case: await _joins(role, name, router, config[pair]) for case, (pair, role, name) in cases.items()}

    with broker_thread(heartbeat_s=1.0, keys=broker_keys) as (b, _):
        outcomes = run(go(b.router_endpoint))
        joined = {case for case, outcome in outcomes.items() if outcome == "joined"}
        assert joined == {"web as frontend", "gpu1 as its runner", "gpu1 as its loader", "sched as scheduler"}
        assert "(web) may not register 'runner-gpu1-cpu' as runner" in outcomes["web as runner"]
        assert "a scheduler's name" in outcomes["web as frontend named scheduler"]

        # L3: a bad key file costs only itself; a removal still takes effect, on a live peer too.
        (folder / "authorized" / "broken.key").write_text("curve\n    public-key = \"not a key\"\n")

        async def revoked() -> tuple[str, str, str]:
            web = _peer(Role.frontend, "http-live", b.router_endpoint, config["web"])
            await web.start(timeout=5)
            (folder / "authorized" / "web.key").unlink()
            await asyncio.sleep(1.5)  # a few reloads
            try:
                await web.ask("scheduler", GetStatus(), timeout=3)
                asked = "answered"
            except RemoteError as exc:
                asked = exc.error.code.value
            except asyncio.TimeoutError:
                asked = "no answer"
            await web.close(drain_timeout=0)
            # Revoked: no answer comes, so a short wait (2 s, not 10) says as much.
            again = await _joins(Role.frontend, "http-again", b.router_endpoint, config["web"], heartbeat_s=1.0)
            still = await _joins(Role.scheduler, "scheduler", b.router_endpoint, config["sched"])
            return asked, again, still

        asked, again, still = run(revoked())
        assert "http-live" not in b.names  # dropped when its key went
        assert asked != "answered" and again != "joined"
        assert still == "joined"  # the other keys reloaded, the broken file notwithstanding
    assert any("broken.key" in r.getMessage() and r.levelname == "ERROR" for r in caplog.records)
    assert any("its key was revoked" in r.getMessage() for r in caplog.records)


def test_l3_key_files_and_folders_are_private(tmp_path, monkeypatch):
    """The secret is created 0600 (never world-readable, whatever the umask); the broker refuses a keys
    or authorized folder that another user may write or owns."""
    created = {}
    real_open = os.open

    def spy(path, flags, mode=0o777, *args, **kwargs):
        created[str(path)] = (flags, mode)
        return real_open(path, flags, mode, *args, **kwargs)

    monkeypatch.setattr(os, "open", spy)
    old = os.umask(0)
    try:
        keys.make(tmp_path / "keys")
    finally:
        os.umask(old)
        monkeypatch.undo()
    secret = tmp_path / "keys" / "peer.key_secret"
    flags, mode = next(v for k, v in created.items() if k.startswith(str(secret)))
    assert mode == 0o600 and flags & os.O_EXCL  # born private, not chmodded after
    assert secret.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "keys").stat().st_mode & 0o777 == 0o700
    config = _curve_config(tmp_path)
    keys.for_broker(config)  # as made: fine
    authorized = tmp_path / "keys" / "authorized"
    authorized.chmod(0o777)
    with pytest.raises(keys.UnsafeFolder, match="writable by other users"):
        keys.for_broker(config)
    authorized.chmod(0o700)
    if os.getuid() == 0:
        os.chown(authorized, NOBODY, NOBODY)
        with pytest.raises(keys.UnsafeFolder, match="belongs to another user"):
            keys.for_broker(config)
        os.chown(authorized, 0, 0)
    done = subprocess.run([sys.executable, "-m", "broker"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "ATELIER_HOME": str(tmp_path),
                               "ATELIER_CONFIG": str(_write_config(tmp_path, curve=True, open_folder=authorized))})
    assert done.returncode == 2 and "writable by other users" in done.stderr


def _write_config(folder: Path, *, curve: bool, open_folder: Path | None = None) -> Path:
    if open_folder is not None:
        open_folder.chmod(0o777)
    path = folder / "atelier.toml"
    path.write_text(f'[broker]\ncurve = {str(curve).lower()}\nkeys = "{folder / "keys"}"\n')
    return path


# --------------------------------------------------------------------------- #
# H3 (b): the default socket


def _broker(home: Path, config: Path) -> tuple[list[str], dict[str, str]]:
    return [sys.executable, "-m", "broker"], {**os.environ, "PYTHONPATH": str(ROOT), "ATELIER_HOME": str(home),
                                              "ATELIER_CONFIG": str(config)}


PROBE = """
import sys, os, zmq
os.setgid(65534); os.setuid(65534)
ctx = zmq.Context(); sock = ctx.socket(zmq.DEALER); sock.setsockopt(zmq.LINGER, 0); sock.connect(sys.argv[1])
try:
    sock.send_multipart([b"ATL1", b"not even a head"], zmq.NOBLOCK)  # any answer at all means it got in
except zmq.Again:
    pass
print("answered" if sock.poll(2000) else "no answer")
"""


def _probe_as_another_user(endpoint: str) -> str:
    done = subprocess.run([sys.executable, "-c", PROBE, endpoint], capture_output=True, text=True, timeout=60, cwd="/")
    return done.stdout.strip() or done.stderr


def test_h3_the_default_socket_is_private_and_not_stolen(tmp_path):
    """With no addresses configured the broker serves on ipc:// sockets in <home>/run (0700): another
    local user cannot connect, and a second broker on the same home says atelier is already running
    rather than unlinking the first one's socket. A home too long for a socket path is a clear error."""
    # A home every user may walk to (pytest's own folders are 0700): only the run folder keeps others out.
    home = Path(f"/tmp/atelier-sec-{uuid.uuid4().hex[:8]}")
    home.mkdir(mode=0o755)
    home.chmod(0o755)
    config = tmp_path / "empty.toml"
    config.write_text("")
    argv, env = _broker(home, config)
    first = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert first.stdout is not None
        line = first.stdout.readline()
        assert line.startswith("ATELIER-READY "), first.stderr.read() if first.poll() is not None else line
        endpoints = json.loads(line[len("ATELIER-READY "):])
        assert endpoints["router"] == f"ipc://{home / 'run' / 'router'}"
        assert (home / "run").stat().st_mode & 0o777 == 0o700

        second = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert second.returncode == 2 and "already running" in second.stderr, second.stderr

        ctx = zmq.Context()
        try:  # the first broker still serves its own user
            sock = _dealer(ctx, endpoints["router"])
            assert isinstance(_hello(sock, "cli-me", Role.frontend).msg, Welcome)
        finally:
            ctx.destroy(linger=0)
        if os.getuid() == 0:
            (home / "run" / "router").chmod(0o777)  # even a socket any umask left open to all
            assert _probe_as_another_user(endpoints["router"]) == "no answer"
            (home / "run").chmod(0o755)  # what the folder's privacy stops: the same probe gets in
            assert _probe_as_another_user(endpoints["router"]) == "answered"
    finally:
        first.terminate()
        first.wait(30)
        subprocess.run(["rm", "-rf", str(home)], check=False)

    argv, env = _broker(tmp_path / ("x" * 100), config)
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "too long for a Unix socket" in done.stderr, done.stderr
    client = subprocess.run([sys.executable, "-m", "frontends.cli", "status"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=60)
    assert client.returncode == 2 and "too long for a Unix socket" in client.stderr, client.stderr


def test_h3_atelier_up_serves_on_the_private_socket_by_default(tmp_path):
    """`atelier up` with no addresses: every part finds the others on the home's ipc sockets, a client
    command on the same home needs no --router, and a second `atelier up` there says it is running."""
    home = tmp_path / "home"
    config = tmp_path / "atelier.toml"
    config.write_text('builtin_models = false\ndefault_model = "noop"\n'
                      '[models.noop]\nfamily = "noop"\nsource = "builtin:noop"\n')
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ATELIER_HOME": str(home), "ATELIER_CONFIG": str(config)}
    up = [sys.executable, "-m", "frontends.cli", "up", "--http", "off", "--devices", "cpu"]
    first = subprocess.Popen(up, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert first.stdout is not None
        while not (line := first.stdout.readline()).startswith("ATELIER-READY "):
            assert line, "atelier up exited early"
        assert json.loads(line[len("ATELIER-READY "):])["router"] == f"ipc://{home / 'run' / 'router'}"
        status = subprocess.run([sys.executable, "-m", "frontends.cli", "status"], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=120)
        assert status.returncode == 0 and "runner-" in status.stdout, status.stdout + status.stderr
        second = subprocess.run([*up, "--ready-timeout", "60"], cwd=ROOT, env=env, capture_output=True, text=True,
                                timeout=120)
        assert second.returncode != 0 and "already running" in second.stdout + second.stderr
        again = subprocess.run([sys.executable, "-m", "frontends.cli", "status"], cwd=ROOT, env=env,
                               capture_output=True, text=True, timeout=120)
        assert again.returncode == 0 and "runner-" in again.stdout  # the first one still serves
    finally:
        first.send_signal(2)
        first.wait(60)


# --------------------------------------------------------------------------- #
# L4: frames


def test_l4_frame_limits_are_checked_early_and_the_broker_goes_on():
    ctx = zmq.Context()
    try:
        with broker_thread(heartbeat_s=5.0) as (b, _):
            assert b.router.getsockopt(zmq.MAXMSGSIZE) == 128 << 20
            assert b.xpub.getsockopt(zmq.MAXMSGSIZE) == broker_module.MAX_SUBSCRIPTION_BYTES
            many = _dealer(ctx, b.router_endpoint)
            many.send_multipart([MAGIC, b"x"] + [b""] * 5000)
            reply = codec.decode(many.recv_multipart()).msg
            assert isinstance(reply, Error) and reply.code is ErrorCode.too_large and "too many frames" in reply.message
            huge = _dealer(ctx, b.router_endpoint)
            huge.send_multipart([MAGIC, b"x", bytes((128 << 20) + 1)])
            assert huge.poll(1500) == 0  # over the frame cap: the connection is dropped, nothing read
            fine = _dealer(ctx, b.router_endpoint)
            assert isinstance(_hello(fine, "after", Role.frontend).msg, Welcome)
    finally:
        ctx.destroy(linger=0)


# --------------------------------------------------------------------------- #
# L5, L6: actors


def test_l5_peers_of_a_restarted_broker_come_back_spread_out(monkeypatch):
    """Every peer notices a restarted broker within one heartbeat; each waits a random part of one
    before its Hello, so they do not all arrive in the same instant."""
    waits: list[float] = []

    async def recorded_sleep(delay):
        waits.append(delay)

    ctx = zmq.asyncio.Context()

    async def go():
        for i in range(20):
            actor = type("Peer", (Actor,), {"role": Role.frontend})(f"p{i}", "tcp://127.0.0.1:1", heartbeat_s=1.0,
                                                                     context=ctx)

            async def registered(timeout):
                return None

            actor._register = registered  # type: ignore[method-assign]
            await actor._register_again()

    monkeypatch.setattr(asyncio, "sleep", recorded_sleep)
    run(go())
    ctx.destroy(linger=0)
    assert len(waits) == 20 and all(0 <= w <= 1.0 for w in waits) and len(set(waits)) > 10


def test_l6_an_internal_error_tells_other_peers_the_kind_not_the_text():
    class Fragile(Actor):
        role = Role.frontend

        @handles(GetStatus)
        async def on_status(self, msg, env):
            raise OSError("/home/secret/weights.safetensors: permission denied on cuda:3")

    async def go(router: str) -> str:
        fragile = Fragile("fragile", router, heartbeat_s=5.0)
        asker = type("Asker", (Actor,), {"role": Role.frontend})("asker", router, heartbeat_s=5.0)
        await fragile.start()
        await asker.start()
        try:
            await asker.ask("fragile", GetStatus(), timeout=5)
        except RemoteError as exc:
            return exc.error.message
        finally:
            await asker.close(drain_timeout=0)
            await fragile.close(drain_timeout=0)
        return "no error"

    with broker_thread(heartbeat_s=5.0) as (b, _):
        message = run(go(b.router_endpoint))
    assert "OSError" in message and "secret" not in message and "cuda" not in message


# --------------------------------------------------------------------------- #
# L1: /dev/shm


@pytest.mark.skipif(staging.SHM_ROOT is None, reason="no /dev/shm")
def test_l1_stray_files_in_dev_shm_neither_stop_the_loader_nor_get_followed(atelier_home, tmp_path):
    """Another user's file named like a dead loader's segment does not stop the loader from starting
    (it is left alone), this user's own orphan is removed, a pre-made symlink is never written
    through, and the loader stages into a fresh name nobody could have guessed."""
    node = f"secwire{uuid.uuid4().hex[:6]}"
    dead = _dead_pid()
    theirs = staging.SHM_ROOT / f"atelier-{node}-{dead}-tiny-sd"
    mine = staging.SHM_ROOT / f"atelier-{node}-{dead}-noop"
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    for path in (theirs, mine):
        path.write_bytes(b"stale")
    if os.getuid() == 0:
        os.chown(theirs, NOBODY, NOBODY)
    with pytest.raises(FileExistsError):  # a name made ready in advance is never opened
        os.close(staging._create(mine))
    link = tmp_path / "segment.partial"
    link.symlink_to(victim)
    with pytest.raises(FileExistsError):
        os.close(staging._create(link))

    from actors.loader import Loader

    config = Config.model_validate({"home": str(atelier_home), "default_model": "tiny-sd",
                                    "broker": {"heartbeat_s": 5.0}})

    async def go(router: str) -> tuple[Staged, str]:
        loader = Loader(config, router, node=node)
        runner = type("Runner", (Actor,), {"role": Role.runner})(f"runner-{node}-cpu", router, heartbeat_s=5.0)
        stranger = type("Web", (Actor,), {"role": Role.frontend})("web-stranger", router, heartbeat_s=5.0)
        await loader.start()
        await runner.start()
        await stranger.start()
        try:
            staged = await runner.ask(loader.name, Stage(model="tiny-sd"), timeout=120)
            try:
                await stranger.ask(loader.name, Stage(model="tiny-sd"), timeout=10)
                refused = "answered"
            except RemoteError as exc:
                refused = exc.error.code.value
            return staged, refused
        finally:
            for actor in (stranger, runner, loader):
                await actor.close(drain_timeout=1)

    try:
        with broker_thread(heartbeat_s=5.0) as (b, _):
            staged, refused = run(go(b.router_endpoint), timeout=200)
        assert staged.segment and Path(staged.segment).name.startswith(f"atelier-{node}-{os.getpid()}-tiny-sd-")
        assert refused == "forbidden"
        assert theirs.exists() == (os.getuid() == 0) and not mine.exists()
        assert victim.read_bytes() == b"keep me"
        assert not list(staging.SHM_ROOT.glob(f"atelier-{node}-{os.getpid()}-*"))  # its own, gone on stop
    finally:
        theirs.unlink(missing_ok=True)
        mine.unlink(missing_ok=True)


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid
