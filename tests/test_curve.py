"""Who gets in: CURVE keys at the broker, no public bind without them, and a flood held to a rate."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq

from actors import codec, keys
from actors.codec import Envelope
from actors.messages import Error, GetStatus, Heartbeat
from atelier.config import Config
from atelier.jobs import ErrorCode, JobSpec, JobState
from broker import Broker
from frontends.client import AtelierClient
from tests.conftest import ROOT, Cluster, broker_thread, run

pytestmark = pytest.mark.timeout(180)


def _keys_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "frontends.cli", "keys", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


def test_atelier_keys_makes_the_pairs_once(tmp_path: Path) -> None:
    folder = tmp_path / "keys"
    made = _keys_cli("--dir", str(folder))
    assert made.returncode == 0, made.stderr
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert names == ["authorized/peer.key", "broker.key", "broker.key_secret", "peer.key", "peer.key_secret"]
    assert (folder / "peer.key_secret").stat().st_mode & 0o077 == 0  # the secret is the owner's alone
    before = (folder / "broker.key_secret").read_bytes()
    again = _keys_cli("--dir", str(folder), "--name", "gpu-2")
    assert again.returncode == 0 and "peer_key = 'gpu-2'" in again.stdout
    assert (folder / "broker.key_secret").read_bytes() == before  # never replaced: no one is locked out
    assert (folder / "authorized" / "gpu-2.key").is_file()
    assert _keys_cli("--dir", str(folder), "--name", "broker").returncode == 2


@pytest.fixture(scope="module")
def curved(atelier_home: Path, tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("curve")
    keys.make(folder / "keys")
    keys.make(folder / "other")  # another pair of the same shape, never authorized at this broker
    config = folder / "atelier.toml"
    config.write_text(f'default_model = "noop"\n[broker]\ncurve = true\nkeys = "{folder / "keys"}"\n'
                      '[models.noop]\nfamily = "noop"\nsource = "builtin:noop"\n')
    cluster = Cluster(atelier_home, config).start()
    yield cluster, folder
    cluster.stop()


def _client(cluster: Cluster, folder: Path, pair: str) -> AtelierClient:
    settings = Config.model_validate({"home": str(folder), "broker": {"curve": True, "keys": str(folder / "keys")}})
    mine = keys.for_peer(settings)
    if pair == "other":  # its own pair from another folder, with the right broker key
        other = keys.for_peer(settings.model_copy(update={"broker": settings.broker.model_copy(
            update={"keys": str(folder / "other")})}))
        mine = keys.PeerKeys(other.public, other.secret, mine.server)
    return AtelierClient(cluster.router, cluster.pub, keys=None if pair == "none" else mine)


def test_a_peer_with_the_key_gets_in_and_one_without_does_not(curved) -> None:
    cluster, folder = curved

    async def go():
        async with _client(cluster, folder, "peer") as client:
            result = await client.generate(JobSpec(model="noop", prompt="keyed", width=64, height=64, steps=2),
                                           timeout=60)
            refused = {}
            for pair in ("other", "none"):
                stranger = _client(cluster, folder, pair)
                try:
                    # No answer ever comes (CURVE drops the connection): one Hello's wait (2 s) says so.
                    await stranger.start(timeout=1)
                    refused[pair] = False
                except TimeoutError:
                    refused[pair] = True
                finally:
                    await stranger.close(drain_timeout=0)
            return result, refused, await client.status()

    result, refused, status = run(go(), timeout=120)
    assert result.job.state is JobState.done
    assert refused == {"other": True, "none": True}  # neither can register, so neither can submit
    assert status.runners  # the node's runner got in with the host's pair


def test_a_raw_socket_without_the_key_reaches_nothing(curved) -> None:
    cluster, _ = curved
    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.ROUTING_ID, b"intruder")
        sock.connect(cluster.router)
        sock.send_multipart(codec.encode(Envelope(GetStatus(), "intruder", "scheduler", 1)))
        assert sock.poll(2000) == 0  # no reply, not even an error: the handshake never completed
        sock.close(linger=0)
    finally:
        ctx.term()


def test_a_public_bind_needs_curve() -> None:
    with pytest.raises(ValueError, match="turn on CURVE"):
        Broker("tcp://0.0.0.0:0", "tcp://127.0.0.1:0")
    Broker("tcp://127.0.0.1:0", "tcp://127.0.0.1:0").close()  # loopback alone is fine


def test_a_flooding_peer_is_held_to_its_rate_and_the_others_go_on() -> None:
    ctx = zmq.Context()
    try:
        with broker_thread(heartbeat_s=5.0, rate_per_s=200, burst=100) as (broker, _):
            flood = ctx.socket(zmq.DEALER)
            flood.setsockopt(zmq.ROUTING_ID, b"flood")
            flood.connect(broker.router_endpoint)
            for i in range(2000):  # far over 100 at once and 200 a second
                flood.send_multipart(codec.encode(Envelope(Heartbeat(), "flood", "broker", i)))
            deadline = time.monotonic() + 10
            while broker.stats.throttled < 1500 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert broker.stats.throttled >= 1500
            told = None
            while flood.poll(1000):
                reply = codec.decode(flood.recv_multipart()).msg
                if isinstance(reply, Error) and reply.code is ErrorCode.busy:
                    told = reply
            assert told is not None and "over 200 messages a second" in told.message

            async def other_peer() -> bool:
                async with AtelierClient(broker.router_endpoint, broker.pub_endpoint, heartbeat_s=5.0) as client:
                    return client.registered.is_set()

            assert asyncio.run(other_peer())  # its own allowance: in at once
            flood.close(linger=0)
    finally:
        ctx.term()


def test_only_the_scheduler_and_runners_publish_their_own_events() -> None:
    from actors.messages import JobEvent, Progress, Role

    async def go(broker: Broker) -> dict[str, str]:
        from actors.actor import Actor, RemoteError

        outcomes = {}
        state = JobEvent(job_id="j1", state=JobState.done)
        step = Progress(job_id="j1", step=1, total=2, elapsed_s=0.1, eta_s=0.1)
        cases = [("frontend", Role.frontend, state, "job/j1/state"),
                 ("runner-as-scheduler", Role.runner, state, "job/j1/state"),
                 ("wrong-topic", Role.runner, step, "job/j1/state"),
                 ("runner", Role.runner, step, "job/j1/progress")]
        for name, role, event, topic in cases:
            peer = type("Peer", (Actor,), {"role": role})(name, broker.router_endpoint, heartbeat_s=5.0)
            await peer.start()
            try:
                await peer.ask("#" + topic, event, timeout=1.0)
                outcomes[name] = "answered"
            except RemoteError as exc:
                outcomes[name] = exc.error.message
            except asyncio.TimeoutError:
                outcomes[name] = "published"  # no reply: it went out on the events socket
            finally:
                await peer.close(drain_timeout=0)
        return outcomes

    with broker_thread(heartbeat_s=5.0) as (broker, _):
        outcomes = asyncio.run(go(broker))
    assert outcomes["runner"] == "published"
    assert outcomes["frontend"] == "a frontend may not publish 'job_event' on 'job/j1/state'"
    assert outcomes["runner-as-scheduler"].startswith("a runner may not publish 'job_event'")
    assert outcomes["wrong-topic"] == "a runner may not publish 'progress' on 'job/j1/state'"
