"""The broker: routes frames between registered peers and republishes events.

It holds no queueing policy (that is the scheduler's): it knows who is
connected, under which role, and whether they are alive. A peer registers with
``Hello`` before anything is routed to or from it; a peer silent for three
heartbeat intervals is dead and the schedulers are told with ``PeerDown``.

It reads only the head of a routed message (``codec.read_head``) and forwards
the frames untouched, large blobs without a copy. A message addressed to a
topic (``#job/<id>/progress``) goes out on the XPUB with that topic in front.

The loop is a plain ``zmq.Poller`` loop (the Majordomo broker's shape): the
broker does nothing but move frames, and that is fastest without an event loop.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import itertools
import json
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import zmq
from pydantic import TypeAdapter, ValidationError
from zmq.auth.thread import ThreadAuthenticator

from actors import codec, keys
from actors.codec import BROKER, PUBLISH, DecodeError, Envelope
from actors.keys import BrokerKeys, Grant
from actors.messages import (
    CLUSTER_TOPIC,
    MESSAGE_ADAPTER,
    MESSAGES,
    ClusterEventKind,
    Error,
    Goodbye,
    Heartbeat,
    Hello,
    PeerDown,
    PeerUp,
    Preview,
    Role,
    Via,
    Welcome,
    kind_of,
)
from atelier.config import RUN_FOLDER, Config
from atelier.jobs import Capabilities, ErrorCode, PeerName, Wire
from atelier.runtime import READY_PREFIX, Failure, process_main, process_parser

log = logging.getLogger("atelier.broker")

HWM = 100_000
KEYS_RELOAD_S = 5.0  # how often the authorized keys are read again
# Per frame: the largest blob atelier sends (an input image, a video) is far below it.
MAX_FRAME_BYTES = 128 << 20
MAX_SUBSCRIPTION_BYTES = 4096  # the XPUB only ever receives subscriptions ("job/<id>/")
MAX_MESSAGE_FRAMES = 1 + 2 + codec.MAX_FRAMES  # routing id, magic, head, blobs
IPC_PATH_MAX = 107  # sun_path holds 108 bytes, with its terminating NUL
# Names that only a peer of that role may take: messages are addressed to them by name, so a
# frontend that registered as "scheduler" (while it is down) would receive every Submit.
RESERVED = (("scheduler", Role.scheduler, True), ("loader-", Role.loader, False), ("runner-", Role.runner, False))
# What only the broker says. The scheduler acts on PeerUp and PeerDown (a runner to use, one gone),
# so a peer that sent them would add a phantom runner or take a real one away.
BROKER_ONLY = frozenset(kind_of(m) for m in MESSAGES if m.route.sent_by == (BROKER,))
NAMES = TypeAdapter(PeerName)
# Who publishes which event, on which topic (codec.topic_of): a frontend or a loader that did would
# put words in the scheduler's or a runner's mouth, on every subscriber's screen.
PREVIEW, HEARTBEAT = kind_of(Preview), kind_of(Heartbeat)
PUBLISHERS = {kind_of(m): (m.route.sent_by[0], m.route.topic) for m in MESSAGES if m.route.via is Via.event}


@dataclass
class Peer:
    name: str
    role: Role
    incarnation: str
    capabilities: Capabilities
    last_seen: float
    last_sent: float = 0.0
    key: bytes | None = None  # CURVE: the public key (z85) it registered with


@dataclass
class BrokerStats:
    routed: int = 0
    published: int = 0
    rejected: int = 0
    subscriptions: int = 0
    dead: int = 0
    throttled: int = 0  # messages dropped over a peer's rate
    previews_shed: int = 0  # previews replaced by a newer one of the same job before they went out
    # Rate-limited logging of bad frames: a flood must not become a flood of log lines.
    _drops_since_log: int = field(default=0, repr=False)
    _last_drop_log: float = field(default=0.0, repr=False)


@dataclass
class _Bucket:
    """A peer's message allowance (a token bucket), and when it was last told it is over it."""

    tokens: float
    stamp: float
    told: float = float("-inf")


class Broker:
    def __init__(self, router: str, pub: str, *, heartbeat_s: float = 1.0,
                 context: zmq.Context | None = None, keys: BrokerKeys | None = None,
                 rate_per_s: float = 20_000.0, burst: int = 50_000, previews_last: bool = True):
        if keys is None:
            for endpoint in (router, pub):
                if not _local(endpoint):
                    raise ValueError(f"{endpoint} is reachable from other hosts: turn on CURVE ([broker] curve "
                                     "= true, keys from `atelier keys`) so that only peers with a key get in")
        # Before binding: libzmq unlinks an existing socket file on bind, which would steal the address
        # of a broker that runs there.
        self._locks = [fd for fd in (_claim_ipc(router), _claim_ipc(pub)) if fd is not None]
        self.heartbeat_s = heartbeat_s
        self.peers: dict[bytes, Peer] = {}  # by routing id
        self.names: dict[str, bytes] = {}  # registered name -> routing id
        self.stats = BrokerStats()
        self._ids = itertools.count(1)
        self.ctx = context or zmq.Context()
        self._own_context = context is None
        self.keys = keys
        self.auth: ThreadAuthenticator | None = None
        self.grants: dict[bytes, Grant] = {}
        self._key_problems: list[str] = []
        if keys is not None:
            self._read_grants()
            # ZAP: the handshake of a peer whose public key is not authorized fails before any frame of
            # it reaches the broker. The callback reads the table this broker keeps (and checks names with).
            self.auth = ThreadAuthenticator(self.ctx)
            self.auth.start()
            self.auth.configure_curve_callback(domain="*", credentials_provider=self)
        self.rate_per_s, self.burst = rate_per_s, burst
        # Previews go out after everything else read in the same burst, the newest of each job only: they are
        # the bulk of what runners send, lossy by design, and must never hold up a result or a progress.
        self.previews_last = previews_last
        self._previews: dict[str, list] = {}  # topic -> the newest preview's frames, until the burst ends
        self.buckets: dict[bytes, _Bucket] = {}
        self._keys_read = time.monotonic()
        self.router = self.ctx.socket(zmq.ROUTER)
        if keys is not None:
            keys.apply(self.router)
        # Fail loudly on an unknown identity instead of dropping, so the sender gets an error.
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # A peer that reconnects (same socket, same routing id) takes its identity over. Routing ids
        # of actors are random (actor.py), so nobody else can; names are bound by Hello alone.
        self.router.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.router.setsockopt(zmq.SNDHWM, HWM)
        self.router.setsockopt(zmq.RCVHWM, HWM)
        self.router.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
        self.router.bind(router)
        self.xpub = self.ctx.socket(zmq.XPUB)
        if keys is not None:
            keys.apply(self.xpub)
        self.xpub.setsockopt(zmq.SNDHWM, HWM)
        self.xpub.setsockopt(zmq.MAXMSGSIZE, MAX_SUBSCRIPTION_BYTES)
        self.xpub.bind(pub)
        self.router_endpoint = self.router.getsockopt_string(zmq.LAST_ENDPOINT)
        self.pub_endpoint = self.xpub.getsockopt_string(zmq.LAST_ENDPOINT)
        self._stopped = threading.Event()

    # -- lifecycle --------------------------------------------------------- #

    def stop(self) -> None:
        self._stopped.set()

    def serve(self, until: threading.Event | None = None) -> None:
        """Routes until ``stop()``, or until ``until`` is set (the process's signal flag)."""
        if until is not None:
            self._stopped = until
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.xpub, zmq.POLLIN)
        tick = self.heartbeat_s / 4
        next_tick = time.monotonic() + tick
        try:
            while not self._stopped.is_set():
                timeout_ms = max(0.0, next_tick - time.monotonic()) * 1000
                ready = dict(poller.poll(timeout_ms))
                if self.router in ready:
                    self._drain_router()
                if self.xpub in ready:
                    self._drain_subscriptions()
                now = time.monotonic()
                if now >= next_tick:
                    self._check_liveness(now)
                    next_tick = now + tick
        finally:
            self.close()

    def close(self) -> None:
        self.router.close(linger=0)
        self.xpub.close(linger=0)
        if self.auth is not None:
            self.auth.stop()
        if self._own_context:
            self.ctx.term()
        for fd in self._locks:
            os.close(fd)
        self._locks = []

    # -- routing ----------------------------------------------------------- #

    def _drain_router(self) -> None:
        try:
            self._drain_burst()
        finally:
            self._send_previews()

    def _send_previews(self) -> None:
        previews, self._previews = self._previews, {}
        for topic, payload in previews.items():
            self.xpub.send_multipart([topic.encode(), *payload], copy=False)
            self.stats.published += 1

    def _drain_burst(self) -> None:
        # Take everything that is waiting before polling again: one poll per burst, not per message.
        for _ in range(10_000):
            if self._stopped.is_set():
                return  # stopping: what is still queued is not ours to route any more
            try:
                frames = self._recv_message()
            except zmq.Again:
                return
            try:
                if len(frames) > MAX_MESSAGE_FRAMES:
                    self._reject(frames[0].bytes, DecodeError(
                        f"too many frames (at most {MAX_MESSAGE_FRAMES - 1})", too_large=True))
                    continue
                self._route(frames)
            except Exception:  # nothing a peer sends may stop the broker
                log.exception("broker: failed to handle a message")

    def _recv_message(self) -> list[zmq.Frame]:
        """One message's frames, keeping no more than one over the limit: the rest are read and let go
        at once, so a message of thousands of frames is refused without being held."""
        frames = [self.router.recv(zmq.NOBLOCK, copy=False)]
        while frames[-1].more:
            frame = self.router.recv(copy=False)  # the parts of a message arrive together
            if len(frames) <= MAX_MESSAGE_FRAMES:
                frames.append(frame)
            elif not frame.more:
                break
        return frames

    def _route(self, frames: list[zmq.Frame]) -> None:
        ident = frames[0].bytes
        if not self._allow(ident):
            return
        payload = frames[1:]
        try:
            # The routing fields only: a body is checked by whoever receives it (codec.read_route says why).
            head = codec.read_route(payload)
            if head.dst == BROKER and head.kind == HEARTBEAT and head.fields == 0 and ident in self.peers:
                # A registered peer's heartbeat, which has no fields: nothing to validate. With 1,000 peers
                # that is 1,000 a second, and validating each was most of what an idle fleet cost the broker.
                self.peers[ident].last_seen = time.monotonic()
                return
            if head.dst == BROKER:
                head, body = codec.read_head(payload)  # ours to act on: built, then validated
        except DecodeError as exc:
            self._reject(ident, exc)
            return
        peer = self.peers.get(ident)
        if head.dst == BROKER:
            self._handle_own(ident, peer, head, body, payload)
            return
        if peer is None:
            self._send_error(ident, ErrorCode.not_registered, "say Hello before sending anything else",
                             corr=head.id)
            return
        peer.last_seen = time.monotonic()
        if head.src != peer.name:
            self._send_error(ident, ErrorCode.bad_request,
                             f"src {head.src!r} is not your registered name {peer.name!r}", corr=head.id)
            return
        if head.kind in BROKER_ONLY:
            self._send_error(ident, ErrorCode.bad_request, f"only the broker sends {head.kind!r}", corr=head.id)
            return
        if head.dst.startswith(PUBLISH):
            topic = head.dst[len(PUBLISH):]
            if not _may_publish(peer.role, head.kind, topic):
                self._send_error(ident, ErrorCode.bad_request, f"a {peer.role.value} may not publish "
                                 f"{head.kind[:64]!r} on {topic[:64]!r}", corr=head.id)
                return
            if self.previews_last and head.kind == PREVIEW:
                if topic in self._previews:
                    self.stats.previews_shed += 1  # a newer frame of the same job: the older one is stale
                self._previews[topic] = payload
                return
            self.xpub.send_multipart([topic.encode(), *payload], copy=False)
            self.stats.published += 1
            return
        target = self.names.get(head.dst)
        if target is None:
            self._send_error(ident, ErrorCode.unroutable, f"no peer named {head.dst!r} is registered",
                             corr=head.id)
            return
        try:
            # Never block: a blocking send to a peer whose queue is full (it stopped reading) would
            # stall the broker for every peer. The sender hears that the target is busy instead.
            self.router.send_multipart([target, *payload], flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            self._send_error(ident, ErrorCode.busy, f"{head.dst!r} is not keeping up (its queue is full)",
                             corr=head.id)
            return
        except zmq.ZMQError as exc:  # EHOSTUNREACH: it went away between Hello and now
            self._send_error(ident, ErrorCode.unroutable, f"{head.dst!r} is unreachable: {exc}", corr=head.id)
            return
        self.peers[target].last_sent = time.monotonic()
        self.stats.routed += 1

    def _handle_own(self, ident: bytes, peer: Peer | None, head: codec.Head, body: dict,
                    payload: list) -> None:
        body["kind"] = head.kind
        try:
            msg = MESSAGE_ADAPTER.validate_python(body)
        except ValidationError as exc:
            self._reject(ident, DecodeError(f"invalid {head.kind}: {exc.errors()[0]['msg']}", id=head.id))
            return
        if isinstance(msg, Hello):
            self._on_hello(ident, head, msg, payload)
        elif peer is None:
            self._send_error(ident, ErrorCode.not_registered, "say Hello before sending anything else",
                             corr=head.id)
        elif isinstance(msg, Heartbeat):
            peer.last_seen = time.monotonic()
        elif isinstance(msg, Goodbye):
            self._forget(ident, f"said goodbye ({msg.reason})")
        else:
            peer.last_seen = time.monotonic()
            self._send_error(ident, ErrorCode.unsupported, f"the broker does not handle {head.kind!r}",
                             corr=head.id)

    def _on_hello(self, ident: bytes, head: codec.Head, hello: Hello, payload: list) -> None:
        name = head.src
        if name == BROKER or not _is_name(name):
            # PeerUp and PeerDown carry the name as a PeerName: any other would fail there, after the
            # Welcome, and the schedulers would never hear of the peer. "broker" would pass for us.
            self._send_error(ident, ErrorCode.bad_request, f"{head.src[:64]!r} cannot be a peer's name: use "
                             "1 to 128 letters, digits and _.:@/+- (not 'broker')", corr=head.id)
            return
        key = self._key_of(payload)
        refusal = self._may_register(name, hello.role, key)
        if refusal is not None:
            log.warning("broker: refused %r as %s: %s", name[:128], hello.role.value, refusal)
            self._send_error(ident, ErrorCode.forbidden, refusal, corr=head.id)
            return
        known = self.peers.get(ident)
        if known is not None and known.name != name:
            self._forget(ident, f"registered again as {name!r}")
            known = None
        holder = self.names.get(name)
        if holder is not None and holder != ident:
            other = self.peers[holder]
            if other.incarnation != hello.incarnation and self._connected(holder):
                # A live peer's name: an impostor's takeover, or a restart before the old connection
                # closed (a crashed host's). The latter gets it once the old one is gone (liveness).
                log.warning("broker: refused %r as %s: the name is in use by a connected peer",
                            name[:128], hello.role.value)
                self._send_error(ident, ErrorCode.forbidden, f"{name!r} is in use by a connected peer; a restarted "
                                 "peer gets it once the old connection is gone", corr=head.id)
                return
            if other.incarnation == hello.incarnation:  # the same process on a new connection
                known = self.peers.pop(holder)
                self.buckets.pop(holder, None)
            else:
                self._forget(holder, "restarted")
        if known is not None and known.incarnation != hello.incarnation:
            # Same name, new process: the old one died without a word (a crash, a SIGKILL).
            self._forget(ident, "restarted")
            known = None
        now = time.monotonic()
        peer = Peer(name, hello.role, hello.incarnation, hello.capabilities, last_seen=now, key=key)
        self.peers[ident] = peer
        self.names[name] = ident
        self._send(ident, Welcome(heartbeat_s=self.heartbeat_s), corr=head.id)
        if known is None:
            log.info("broker: %s joined as %s", peer.name, peer.role.value)
            up = PeerUp(name=peer.name, role=peer.role, capabilities=peer.capabilities)
            self._tell_schedulers(up, skip=ident)
            if peer.role is Role.scheduler:
                for other_ident, other in self.peers.items():
                    if other_ident != ident:
                        self._send(ident, PeerUp(name=other.name, role=other.role,
                                                 capabilities=other.capabilities))

    def _may_register(self, name: str, role: Role, key: bytes | None) -> str | None:
        """Why ``name`` may not register as ``role`` (with CURVE key ``key``); None if it may."""
        for reserved, owner, whole in RESERVED:
            if (name == reserved if whole else name.startswith(reserved)) and role is not owner:
                return f"{name[:64]!r} is a {owner.value}'s name: a {role.value} may not take it"
        if self.keys is None:
            return None
        grant = self.grants.get(key or b"")
        if grant is None:
            return "your CURVE key is no longer authorized"
        if not grant.allows(role.value, name):
            return (f"your CURVE key ({grant.key_name}) may not register {name[:64]!r} as {role.value} (it may be "
                    f"{' or '.join(grant.roles)} named {' or '.join(grant.names)}; `atelier keys --role` makes keys)")
        return None

    def _key_of(self, payload: list) -> bytes | None:
        """The CURVE public key (z85) the message came with: ZAP puts it on every frame as User-Id."""
        if self.keys is None:
            return None
        try:
            return payload[0].get("User-Id").encode()
        except (zmq.ZMQError, AttributeError):
            return None

    def _connected(self, ident: bytes) -> bool:
        """Whether a connection holds ``ident`` now (ROUTER_MANDATORY says so on a send)."""
        frames = codec.encode(Envelope(Heartbeat(), BROKER, self.peers[ident].name, next(self._ids), None))
        try:
            self.router.send_multipart([ident, *frames], flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return True  # connected, not reading
        except zmq.ZMQError:
            return False
        return True

    # -- keys -------------------------------------------------------------- #

    def callback(self, domain: str, key: bytes) -> bool:
        """ZAP (in the authenticator's thread): whether a connecting key is authorized."""
        return key in self.grants

    def _read_grants(self) -> None:
        assert self.keys is not None
        try:
            grants, problems = keys.read_grants(self.keys.authorized)
        except OSError as exc:  # the folder itself: keep what was read last rather than let nobody in
            problems, grants = [f"{self.keys.authorized}: {exc}"], self.grants
        if problems != self._key_problems:
            for problem in problems:
                log.error("broker: refused an authorized key file: %s", problem)
        self._key_problems = problems
        for grant in grants.values():
            if grant.unbound and grant not in self.grants.values():
                log.warning("broker: key %s may register any name as any role (an all-roles pair, or a file "
                            "without grants): make per-role keys with `atelier keys --role`", grant.key_name)
        self.grants = grants  # one assignment: the authenticator thread sees the old table or the new
        for ident, peer in list(self.peers.items()):
            if self._may_register(peer.name, peer.role, peer.key) is not None:
                self._send_error(ident, ErrorCode.forbidden, "your CURVE key was revoked", corr=None)
                self._forget(ident, "its key was revoked")

    def _forget(self, ident: bytes, reason: str) -> None:
        peer = self.peers.pop(ident, None)
        if peer is None:
            return
        if self.names.get(peer.name) == ident:
            del self.names[peer.name]
        log.info("broker: %s (%s) is gone: %s", peer.name, peer.role.value, reason)
        self._tell_schedulers(PeerDown(name=peer.name, role=peer.role, reason=reason))

    def _tell_schedulers(self, msg: Wire, skip: bytes | None = None) -> None:
        for ident, peer in list(self.peers.items()):
            if peer.role is Role.scheduler and ident != skip:
                self._send(ident, msg)

    # -- liveness ---------------------------------------------------------- #

    def _allow(self, ident: bytes) -> bool:
        """Takes one message from the peer's allowance; over it, the message is dropped (and the
        peer told so, once a second)."""
        now = time.monotonic()
        bucket = self.buckets.get(ident)
        if bucket is None:
            bucket = self.buckets[ident] = _Bucket(float(self.burst), now)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.stamp) * self.rate_per_s)
        bucket.stamp = now
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return True
        self.stats.throttled += 1
        if now - bucket.told >= 1.0:
            bucket.told = now
            self._send_error(ident, ErrorCode.busy, f"over {self.rate_per_s:g} messages a second: "
                                                    "messages are being dropped", corr=None)
        return False

    def _check_liveness(self, now: float) -> None:
        # Allowances of peers quiet for a minute are full again: forgetting them changes nothing.
        for ident in [i for i, b in self.buckets.items() if now - b.stamp > 60 and i not in self.peers]:
            del self.buckets[ident]
        if self.auth is not None and now - self._keys_read > KEYS_RELOAD_S:
            self._keys_read = now
            self._read_grants()  # one taken out: refused, and its peers dropped
        deadline = 3 * self.heartbeat_s
        for ident, peer in list(self.peers.items()):
            if now - peer.last_seen > deadline:
                self.stats.dead += 1
                self._forget(ident, f"silent for {now - peer.last_seen:.1f}s")
            elif now - peer.last_sent >= self.heartbeat_s:
                self._send(ident, Heartbeat())

    def _drain_subscriptions(self) -> None:
        # XPUB hands us (un)subscriptions; we only count them, nobody needs them to route.
        while True:
            try:
                self.xpub.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.stats.subscriptions += 1

    # -- replies ----------------------------------------------------------- #

    def _send(self, ident: bytes, msg: Wire, corr: int | None = None) -> None:
        peer = self.peers.get(ident)
        dst = peer.name if peer is not None else ident.decode(errors="replace")
        frames = codec.encode(Envelope(msg, BROKER, dst, next(self._ids), corr))
        try:
            # NOBLOCK: a peer that floods and never reads its replies fills its queue; blocking on it
            # would stall the broker for everyone (found by tests/test_fuzz_wire.py). Its replies are dropped.
            self.router.send_multipart([ident, *frames], flags=zmq.NOBLOCK, copy=False)
        except zmq.ZMQError:
            return  # the peer is gone (liveness will notice) or not reading
        if peer is not None:
            peer.last_sent = time.monotonic()

    def _send_error(self, ident: bytes, code: ErrorCode, message: str, corr: int | None) -> None:
        self.stats.rejected += 1
        self._send(ident, Error(code=code, message=message), corr=corr)

    def _reject(self, ident: bytes, exc: DecodeError) -> None:
        code = ErrorCode.too_large if exc.too_large else ErrorCode.malformed
        self._send_error(ident, code, str(exc), corr=exc.id)
        stats = self.stats
        stats._drops_since_log += 1
        now = time.monotonic()
        if now - stats._last_drop_log >= 1.0:
            # %r: the text quotes what the peer sent (a kind, a field name), which may hold a newline
            # that would forge a log line.
            log.warning("broker: rejected %d malformed message(s), latest from %r: %r",
                        stats._drops_since_log, ident[:32], str(exc)[:500])
            stats._drops_since_log = 0
            stats._last_drop_log = now


CLUSTER_EVENTS = frozenset(kind.value for kind in ClusterEventKind)


def _may_publish(role: Role, kind: str, topic: str) -> bool:
    allowed = PUBLISHERS.get(kind)
    if allowed is None or role is not allowed[0]:
        return False
    parts = topic.split("/")
    if allowed[1] == CLUSTER_TOPIC:
        return len(parts) == 2 and parts[0] == CLUSTER_TOPIC and parts[1] in CLUSTER_EVENTS
    return len(parts) == 3 and parts[0] == "job" and bool(parts[1]) and parts[2] == allowed[1]


def _local(endpoint: str) -> bool:
    """Whether only this host can reach the endpoint (loopback TCP, IPC, inproc)."""
    if not endpoint.startswith("tcp://"):
        return True
    host = endpoint[len("tcp://"):].rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")


def _claim_ipc(endpoint: str) -> int | None:
    """For an ipc:// endpoint: checks its path fits a Unix socket, makes its folder (0700) and takes
    the lock beside it that says a broker serves there; returns the lock's fd (None for other endpoints).
    ValueError says what is wrong: a path too long, or a broker already running there."""
    if not endpoint.startswith("ipc://") or endpoint[len("ipc://"):].startswith(("@", "*")):
        return None  # abstract sockets (no file) and ipc://* bind like ports: EADDRINUSE speaks for them
    path = Path(endpoint[len("ipc://"):])
    if len(os.fsencode(path)) > IPC_PATH_MAX:
        raise ValueError(f"{endpoint} is too long for a Unix socket ({len(os.fsencode(path))} bytes, at most "
                         f"{IPC_PATH_MAX}): use a shorter ATELIER_HOME, or set [broker] router and pub (e.g. "
                         "ipc:///run/user/$UID/atelier/router, or tcp://127.0.0.1:5555)")
    if not path.parent.exists():
        path.parent.mkdir(parents=True, mode=0o700)
    elif path.parent.stat().st_mode & 0o077:
        log.warning("broker: %s is in a folder other local users may enter: they can connect to it", endpoint)
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ValueError(f"atelier is already running at {endpoint} (another broker holds it): stop that one, "
                         "or give this one other addresses (--router and --pub, or another ATELIER_HOME)") from None
    return fd


def _is_name(text: str) -> bool:
    try:
        NAMES.validate_python(text)
    except ValidationError:
        return False
    return True


def serve(args: argparse.Namespace, config: Config, stop: threading.Event) -> None:
    router, pub = args.router or config.broker.router, args.pub or config.broker.pub
    try:
        for endpoint in (router, pub):
            run = config.home.expanduser() / RUN_FOLDER
            if endpoint.startswith("ipc://") and Path(endpoint[len("ipc://"):]).parent == run:
                keys.private_folder(run)  # the default's: only this user may connect
        broker = Broker(router, pub,
                        heartbeat_s=config.broker.heartbeat_s, keys=keys.for_broker(config),
                        rate_per_s=config.broker.peer_rate_per_s, burst=config.broker.peer_burst)
    except zmq.ZMQError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise  # process_main says which address, and what to do
        raise Failure(f"cannot bind: {exc}", 2) from None
    except (ValueError, keys.CurveKeyError) as exc:
        raise Failure(str(exc), 2) from None
    # The ready line: a supervisor reads the real endpoints (port 0 binds) from it.
    print(READY_PREFIX + json.dumps({"router": broker.router_endpoint, "pub": broker.pub_endpoint}),
          flush=True)
    log.info("broker: routing on %s, publishing on %s", broker.router_endpoint, broker.pub_endpoint)
    broker.serve(until=stop)


def main(argv: list[str] | None = None) -> int:
    parser = process_parser("atelier broker", "Run the atelier broker.",
                            router="ROUTER endpoint to bind (default ipc://<home>/run/router), e.g. "
                                   "tcp://127.0.0.1:5555",
                            pub="XPUB endpoint to bind (default ipc://<home>/run/pub), e.g. tcp://127.0.0.1:5556")
    return process_main(parser, serve, argv, log_name="broker",
                        other_address="choose free ports with --router and --pub (or [broker] router and pub "
                                      "in the config)")


if __name__ == "__main__":
    sys.exit(main())
