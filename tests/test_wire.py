"""The codec and the broker, with real sockets but no model: framing, routing, liveness, bad input."""

from __future__ import annotations

import time
import uuid

import msgpack
import pytest
import zmq

from actors import codec
from actors.codec import DecodeError, Envelope
from actors.messages import Error, Heartbeat, Hello, PeerDown, PeerUp, Preview, Role, Submit, Welcome
from atelier.jobs import Capabilities, ErrorCode, JobSpec
from broker import Broker
from tests.conftest import broker_thread, eventually

pytestmark = pytest.mark.timeout(60)


# -- codec ------------------------------------------------------------------ #


def test_blobs_travel_out_of_band_and_come_back():
    image = bytes(range(256)) * 1024  # 256 KiB
    frames = codec.encode(Envelope(Preview(job_id="j1", step=3, width=8, height=8, image=image), "a", "b", 5))
    assert frames[0] == codec.MAGIC and len(frames) == 3
    assert frames[2] is image  # handed to zmq as is: no copy on our side
    assert len(frames[1]) < 100  # the head only references it
    env = codec.decode([zmq.Frame(f) for f in frames])
    assert env.msg.image == image and env.src == "a" and env.dst == "b" and env.id == 5
    assert isinstance(env.msg.image, memoryview)  # large received frames are not copied either


def test_round_trip_keeps_every_field():
    spec = JobSpec(model="tiny-sd", prompt="a lighthouse", width=64, steps=9, seed=3, count=2)
    env = codec.decode(codec.encode(Envelope(Submit(job=spec), "c", "scheduler", 1, corr=None)))
    assert env.msg == Submit(job=spec)


@pytest.mark.parametrize("frames, text", [
    ([b"ATL1"], "at least 2 frames"),
    ([b"nope", b"\x90"], "bad magic"),
    ([b"ATL1", b"\xc1"], "not msgpack"),
    ([b"ATL1", msgpack.packb([1, 2, 3])], "head must be"),
    ([b"ATL1", msgpack.packb(["submit", "id", None, "a", "b", {}])], "wrong types"),
    ([b"ATL1", msgpack.packb(["launch_missiles", 1, None, "a", "b", {}])], "launch_missiles"),
    ([b"ATL1", msgpack.packb(["heartbeat", 1, None, "a", "b", {"extra": 1}])], "extra"),
    ([b"ATL1", msgpack.packb(["preview", 1, None, "a", "b", {"job_id": "j", "step": 1, "width": 1,
                                                            "height": 1, "image": msgpack.ExtType(1, b"\x00\x05")}])],
     "blob reference"),
    ([b"ATL1", b"\x90"] + [b"x"] * 100, "too many frames"),
])
def test_malformed_frames_raise_decode_error(frames, text):
    with pytest.raises(DecodeError) as caught:
        codec.decode(frames)
    assert text in str(caught.value)


def test_bad_field_is_named():
    body = JobSpec(model="m", prompt="p").model_dump(mode="json")
    body["steps"] = 10**9
    frames = [b"ATL1", msgpack.packb(["submit", 4, None, "cli", "scheduler", {"job": body}])]
    with pytest.raises(DecodeError) as caught:
        codec.decode(frames)
    assert caught.value.field == "job.steps" and caught.value.id == 4 and caught.value.src == "cli"


# -- broker ----------------------------------------------------------------- #


@pytest.fixture
def broker():
    with broker_thread(heartbeat_s=0.1) as (b, _):
        yield b


class Peer:
    """A bare DEALER speaking the wire protocol by hand."""

    def __init__(self, broker: Broker, name: str, role: Role = Role.frontend):
        self.name = name
        self.role = role
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.ROUTING_ID, name.encode())
        self.sock.setsockopt(zmq.RCVTIMEO, 3000)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(broker.router_endpoint)
        self.ids = iter(range(1, 10**9))

    def send(self, dst: str, msg, src: str | None = None) -> int:
        msg_id = next(self.ids)
        self.sock.send_multipart(codec.encode(Envelope(msg, src or self.name, dst, msg_id)))
        return msg_id

    def recv(self, skip_heartbeats: bool = True) -> Envelope:
        while True:
            env = codec.decode(self.sock.recv_multipart())
            if not (skip_heartbeats and isinstance(env.msg, Heartbeat)):
                return env

    def hello(self) -> None:
        self.send("broker", Hello(role=self.role, incarnation=uuid.uuid4().hex,
                                  capabilities=Capabilities(pid=1)))
        assert isinstance(self.recv().msg, Welcome)

    def close(self) -> None:
        self.sock.close()


def test_nothing_is_routed_before_hello(broker):
    a = Peer(broker, "a")
    msg_id = a.send("b", Heartbeat())
    reply = a.recv()
    assert isinstance(reply.msg, Error) and reply.msg.code is ErrorCode.not_registered and reply.corr == msg_id
    a.close()


def test_routes_between_registered_peers_and_refuses_unknown_destinations(broker):
    a, b = Peer(broker, "a"), Peer(broker, "b")
    a.hello()
    b.hello()
    spec = JobSpec(model="m", prompt="p")
    a.send("b", Submit(job=spec))
    got = b.recv()
    assert got.src == "a" and got.msg == Submit(job=spec)
    msg_id = a.send("nobody", Heartbeat())
    reply = a.recv()
    assert reply.msg.code is ErrorCode.unroutable and reply.corr == msg_id and "nobody" in reply.msg.message
    a.send("b", Heartbeat(), src="b")  # spoofing another peer's name
    assert a.recv().msg.code is ErrorCode.bad_request
    a.close()
    b.close()


def test_silent_peer_is_declared_dead_to_the_scheduler(broker):
    scheduler = Peer(broker, "scheduler", Role.scheduler)
    scheduler.hello()
    runner = Peer(broker, "runner-x", Role.runner)
    runner.hello()
    up = scheduler.recv()
    assert isinstance(up.msg, PeerUp) and up.msg.name == "runner-x"
    started = time.monotonic()
    # The scheduler heartbeats every 20 ms, so it stays alive; the runner says nothing more.
    poller = zmq.Poller()
    poller.register(scheduler.sock, zmq.POLLIN)

    def peer_down() -> Envelope | None:
        scheduler.send("broker", Heartbeat())
        if poller.poll(20):
            env = scheduler.recv(skip_heartbeats=False)
            if isinstance(env.msg, PeerDown):
                return env
        return None

    env = eventually(peer_down, timeout=10, interval=0)
    waited = time.monotonic() - started
    assert env is not None and isinstance(env.msg, PeerDown), env
    assert env.msg.name == "runner-x" and "silent" in env.msg.reason
    assert 0.25 <= waited < 2.0  # three 0.1 s intervals, plus a liveness tick
    scheduler.close()
    runner.close()


def test_broker_survives_a_flood_of_garbage(broker):
    junk = Peer(broker, "junk")
    for i in range(1000):
        junk.sock.send_multipart([b"ATL1", bytes([i % 256]) * (i % 7 + 1)])
    # Every bad message gets an error reply, none is silently swallowed.
    replies = [junk.recv(skip_heartbeats=False).msg for _ in range(1000)]
    assert all(isinstance(r, Error) and r.code is ErrorCode.malformed for r in replies)
    a, b = Peer(broker, "a"), Peer(broker, "b")
    a.hello()
    b.hello()
    a.send("b", Heartbeat())
    assert b.recv(skip_heartbeats=False).src == "a"
    for p in (junk, a, b):
        p.close()
