"""The actor base every peer process builds on (scheduler, loader, runner, frontends).

An actor owns one DEALER connected to the broker's ROUTER. Its receive loop
resolves replies to ``ask`` directly and puts every other message in the
mailbox; one task takes the mailbox in order and calls the handler registered
for the message's type. Because replies bypass the mailbox, a handler may
``ask`` another actor without deadlocking its own actor.

Liveness (the ZeroMQ guide's Paranoid Pirate): the actor sends a heartbeat
after ``heartbeat_s`` of silence, busy or not, and treats a broker it has not
heard from for three intervals as lost and says Hello again, with backoff,
until one answers. ZeroMQ reconnects the DEALER's connection by itself, so the
socket is kept. A broker that restarted answers ``not_registered`` to a peer it
does not know, which also makes the peer say Hello again.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import os
import random
import secrets
import socket
import time
import uuid
from typing import Any, Awaitable, Callable, ClassVar, TypeVar, cast

import zmq
import zmq.asyncio

from actors import codec
from actors.codec import BROKER, PUBLISH, DecodeError, Envelope
from actors.keys import PeerKeys
from actors.messages import AnsweredBy, Error, Goodbye, Heartbeat, Hello, Role, kind_of, reply_types
from atelier.jobs import Capabilities, ErrorCode, Wire
from atelier.runtime import Failure, TaskSet

log = logging.getLogger(__name__)

Handler = Callable[[Any, Any, Envelope], Awaitable[Wire | None]]
HWM = 100_000  # messages, per socket direction; a burst of jobs must not block senders
_RESEND: Any = object()  # an ask's answer when the broker it went through was replaced: send it again
MISSED_HEARTBEATS = 3
Reply = TypeVar("Reply")


def handles(*types: type[Wire]):
    """Marks an actor method as the handler of the given message types."""

    def mark(fn):
        fn.__handles__ = types
        return fn

    return mark


def connect(sock: zmq.Socket, endpoint: str) -> None:
    """``sock.connect(endpoint)``; an address that cannot be is a Failure that says what to do."""
    try:
        sock.connect(endpoint)
    except zmq.ZMQError as exc:
        sock.close(linger=0)
        if exc.errno == errno.ENAMETOOLONG:  # ipc:// in a deep home
            raise Failure(f"{endpoint} is too long for a Unix socket (at most 107 bytes): use a shorter "
                          "ATELIER_HOME, or give the broker's addresses with --router and --pub ([broker] router "
                          "and pub)", 2) from None
        raise Failure(f"cannot connect to {endpoint}: {exc}", 2) from None


def internal_error(who: str, doing: str, exc: BaseException) -> Error:
    """What another peer hears of a failure here: its kind, not its text (paths, device details),
    which the log above it keeps."""
    return Error(code=ErrorCode.internal, message=f"{who} failed on {doing} ({type(exc).__name__}); its log says why")


class RemoteError(Exception):
    """The peer answered an ``ask`` with an Error."""

    def __init__(self, error: Error):
        super().__init__(f"{error.code.value}: {error.message}")
        self.error = error


class UnexpectedReply(Exception):
    """The peer answered an ``ask`` with a message its protocol does not answer it with."""

    def __init__(self, asked: str, msg: Wire, reply: Wire):
        expected = " or ".join(kind_of(t) for t in reply_types(type(msg))) or "nothing (it is not asked)"
        super().__init__(f"{asked} answered {kind_of(type(msg))} with {kind_of(type(reply))}; "
                         f"the protocol answers it with {expected}")
        self.reply = reply


class NoBroker(Failure, TimeoutError):
    """No broker answered at the actor's router address: atelier is not up there (or not yet)."""

    def __init__(self, router: str):
        super().__init__(f"no atelier broker answers at {router}: start atelier with `atelier up`, or give "
                         "the address of a running one with --router (or [broker] router in the config)", 3)


class Actor:
    role: ClassVar[Role]
    _handlers: ClassVar[dict[type, Handler]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        table: dict[type, Handler] = {}
        for klass in reversed(cls.__mro__):
            for attr in vars(klass).values():
                for msg_type in getattr(attr, "__handles__", ()):
                    table[msg_type] = attr
        cls._handlers = table

    def __init__(self, name: str, router: str, *, heartbeat_s: float = 1.0,
                 context: zmq.asyncio.Context | None = None, keys: PeerKeys | None = None):
        self.name = name
        self.router = router
        self.keys = keys  # CURVE: this peer's key pair and the broker's public key
        self.heartbeat_s = heartbeat_s
        self.incarnation = uuid.uuid4().hex
        self.ctx = context or zmq.asyncio.Context()
        self._own_context = context is None
        self._sock: zmq.asyncio.Socket | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[str, asyncio.Future]] = {}  # ask id -> (whom we asked, their answer)
        self._mailbox: asyncio.Queue[Envelope] = asyncio.Queue()
        self._last_sent = 0.0
        self._last_heard = 0.0
        self._tasks = TaskSet(name)
        self._registering: asyncio.Future | None = None
        self.registered: asyncio.Event | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    # -- to override ------------------------------------------------------- #

    def capabilities(self) -> Capabilities:
        return Capabilities(pid=os.getpid(), host=socket.gethostname())

    async def on_start(self) -> None:
        """After the first registration, before the mailbox runs."""

    async def drain(self) -> None:
        """On shutdown, before the mailbox stops: finish or hand back work in hand."""

    async def on_stop(self) -> None:
        """Last words, while the socket is still open."""

    async def on_reconnect(self) -> None:
        """After registering again with a broker that had forgotten us (it restarted): messages sent
        to us meanwhile were dropped, so ask again for what matters."""

    # -- lifecycle --------------------------------------------------------- #

    async def start(self, timeout: float = 30.0) -> None:
        """Connects, registers with the broker (ready handshake) and starts the loops."""
        self.loop = asyncio.get_running_loop()
        self.registered = asyncio.Event()
        self._open_socket()
        self._tasks.spawn(self._receive_loop(), "recv")
        self._tasks.spawn(self._liveness_loop(), "live")
        try:
            await self._register(timeout)
            await self.on_start()
        except BaseException:
            # Refused, unreachable or cancelled: nothing of this try stays open behind the error.
            await self._tasks.cancel_all()
            if self._sock is not None:
                self._sock.close(linger=0)
                self._sock = None
            raise
        self._tasks.spawn(self._mailbox_loop(), "mailbox")

    async def run(self, stop: asyncio.Event) -> None:
        """A process's life as this actor: starts, runs until ``stop`` is set (the process's signal flag,
        see atelier.runtime.process_main), then shuts down cleanly."""
        await self.start()
        await stop.wait()
        await self.close()

    async def close(self, drain_timeout: float = 10.0) -> None:
        """Drain, stop, say goodbye, close the socket, then the context."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.drain(), drain_timeout)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._mailbox.join(), drain_timeout)
        with contextlib.suppress(Exception):
            await self.on_stop()
        with contextlib.suppress(Exception):
            # Bounded: with no connection (a broker that refused our key) the send would wait for ever.
            await asyncio.wait_for(self.send(BROKER, Goodbye()), 1.0)
        await self._tasks.cancel_all()
        for _, fut in self._pending.values():
            if not fut.done():
                fut.cancel()
        if self._sock is not None:
            self._sock.close(linger=500)  # long enough to flush the Goodbye
            self._sock = None
        if self._own_context:
            self.ctx.term()

    # -- sending ----------------------------------------------------------- #

    async def send(self, dst: str, msg: Wire, *, corr: int | None = None) -> int:
        msg_id = next(self._ids)
        await self._send_frames(codec.encode(Envelope(msg, self.name, dst, msg_id, corr)))
        return msg_id

    async def send_watched(self, dst: str, msg: Wire, watch_s: float) -> asyncio.Future:
        """Sends ``msg`` as told (its real answer comes later, as a message of its own), and returns a
        future that a reply correlated to it within ``watch_s`` resolves: a refusal on its way, the
        broker's (too large, the receiver gone or its queue full) or the receiver's. Cancelled when the
        time is up without one. A message larger than one may be is not sent: the broker would refuse it
        without saying which it was, so the future holds that refusal at once."""
        msg_id = next(self._ids)
        frames = codec.encode(Envelope(msg, self.name, dst, msg_id, None))
        answer = asyncio.get_running_loop().create_future()
        blobs, head = len(frames) - 2, len(frames[1])
        if blobs > codec.MAX_FRAMES or head > codec.MAX_HEAD_BYTES:
            answer.set_result(Error(code=ErrorCode.too_large, message=f"{blobs} blobs and a head of {head} "
                                    "bytes, above what one message may carry"))
            return answer
        self._pending[msg_id] = (dst, answer)  # the receive loop hands a reply to this message here
        answer.add_done_callback(lambda _: self._pending.pop(msg_id, None))
        asyncio.get_running_loop().call_later(watch_s, answer.cancel)
        await self._send_frames(frames)
        return answer

    async def _send_frames(self, frames: list) -> None:
        assert self._sock is not None, "actor is not started"
        self._last_sent = time.monotonic()
        await self._sock.send_multipart(frames, copy=False)

    async def ask(self, dst: str, msg: AnsweredBy[Reply], timeout: float = 10.0) -> Reply:
        """Sends ``msg`` and waits for the reply its type declares; an Error reply raises RemoteError,
        a reply of another type UnexpectedReply.

        A broker that restarted refuses us (``not_registered``) without routing the
        message, so it is safe to send it once more after registering again.
        """
        message = cast(Wire, msg)  # every AnsweredBy is a Wire too
        reply = await self._ask_once(dst, message, timeout)
        if reply is _RESEND:  # sent to a broker that died: the new one never saw it
            reply = await self._resend(dst, message, timeout)
        if isinstance(reply, Error) and reply.code is ErrorCode.not_registered and not isinstance(msg, Hello):
            self._reregister()
            assert self.registered is not None
            await asyncio.wait_for(self.registered.wait(), timeout)
            # A restarted broker: ``dst`` may register with it after us (a scheduler whose Hello is jittered).
            reply = await self._resend(dst, message, timeout)
        if isinstance(reply, Error):
            raise RemoteError(reply)
        if not isinstance(reply, reply_types(type(message))):
            raise UnexpectedReply(dst, message, reply)
        return cast(Reply, reply)

    async def _resend(self, dst: str, msg: Wire, timeout: float) -> Wire:
        """Sends an ask again after the broker was replaced. Peers register with the new broker in
        any order, so ``dst`` may not be back yet: it gets until ``timeout`` to be."""
        deadline = time.monotonic() + timeout
        while True:
            reply = await self._ask_once(dst, msg, max(0.1, deadline - time.monotonic()))
            again = reply is _RESEND or (isinstance(reply, Error) and reply.code is ErrorCode.unroutable)
            if not again:
                return reply
            if time.monotonic() > deadline:
                raise asyncio.TimeoutError(f"{dst} did not come back after the broker restarted")
            await asyncio.sleep(0.2)

    async def _ask_once(self, dst: str, msg: Wire, timeout: float) -> Wire:
        msg_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = (dst, future)
        try:
            frames = codec.encode(Envelope(msg, self.name, dst, msg_id, None))
            assert self._sock is not None, "actor is not started"
            self._last_sent = time.monotonic()
            sock = self._sock

            async def exchange() -> Wire:
                # The send is inside the timeout too: with no connection up (a broker that refuses
                # our CURVE key, one not started yet) a DEALER's send waits for one, for ever.
                await sock.send_multipart(frames, copy=False)
                return await future

            return await asyncio.wait_for(exchange(), timeout)
        finally:
            self._pending.pop(msg_id, None)

    async def reply(self, env: Envelope, msg: Wire) -> None:
        await self.send(env.src, msg, corr=env.id)

    async def publish(self, event: Wire) -> None:
        await self.send(PUBLISH + codec.topic_of(event), event)

    def send_threadsafe(self, dst: str, msg: Wire) -> None:
        """For worker threads: schedules a send on the actor's loop."""
        assert self.loop is not None
        self.loop.call_soon_threadsafe(self._spawn_send, dst, msg)

    def publish_threadsafe(self, event: Wire) -> None:
        self.send_threadsafe(PUBLISH + codec.topic_of(event), event)

    def _spawn_send(self, dst: str, msg: Wire) -> None:
        self._tasks.spawn(self.send(dst, msg), "send")

    # -- loops ------------------------------------------------------------- #

    def _open_socket(self) -> None:
        sock = self.ctx.socket(zmq.DEALER)
        # Random, not the name: the broker binds the name at Hello, and an identity nobody can guess
        # is one no other connection can take over (ROUTER_HANDOVER) to receive what is sent to us.
        sock.setsockopt(zmq.ROUTING_ID, secrets.token_hex(16).encode())
        if self.keys is not None:
            self.keys.apply(sock)
        sock.setsockopt(zmq.SNDHWM, HWM)
        sock.setsockopt(zmq.RCVHWM, HWM)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        # ZeroMQ reconnects only a connection that fails, and a partition fails none: after one of 20 s the
        # broker's TCP retransmissions have backed off to 13 s and more (up to 2 minutes after longer ones),
        # so the peer's Hello gets through at once and the Welcome only that long after. ZMTP heartbeats
        # (answered by libzmq's own threads, so a busy event loop never misses one) drop a connection
        # silent for MISSED_HEARTBEATS intervals and connect afresh; a connect attempt gives up after two
        # intervals and is made again, rather than wait out the kernel's SYN retries (a minute and more).
        interval_ms = max(int(self.heartbeat_s * 1000), 100)
        sock.setsockopt(zmq.HEARTBEAT_IVL, interval_ms)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, MISSED_HEARTBEATS * interval_ms)
        sock.setsockopt(zmq.CONNECT_TIMEOUT, 2 * interval_ms)
        # Unsent messages (a Hello to a broker that refused our key) never hold up the context's end
        # for ever, however the socket ends: a garbage-collected context would block its thread.
        sock.setsockopt(zmq.LINGER, 1000)
        connect(sock, self.router)
        self._sock = sock
        self._last_heard = time.monotonic()

    async def _register(self, timeout: float | None) -> None:
        """Says Hello until the broker answers Welcome, with backoff between tries."""
        assert self.registered is not None
        self.registered.clear()
        delay = 0.1
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            hello = Hello(role=self.role, incarnation=self.incarnation, capabilities=self.capabilities())
            try:
                welcome = await self.ask(BROKER, hello, timeout=max(self.heartbeat_s * 2, 1.0))
            except (asyncio.TimeoutError, RemoteError, UnexpectedReply) as exc:
                refused = isinstance(exc, RemoteError) and exc.error.code is ErrorCode.forbidden
                if deadline is not None and time.monotonic() > deadline:
                    if refused:
                        raise Failure(f"the broker at {self.router} refuses {self.name}: {exc.error.message}",
                                      3) from None
                    raise NoBroker(self.router) from exc
                if refused:
                    log.warning("%s: the broker refused us: %s", self.name, exc.error.message)
                else:
                    log.info("%s: broker not answering (%s); retrying in %.1fs", self.name, exc or "timeout",
                             delay)
                # Jittered: the peers of a restarted broker all notice at once, and must not all
                # come back in step.
                await asyncio.sleep(delay * random.uniform(0.5, 1.5))
                delay = min(delay * 2, 2.0)
                continue
            self.heartbeat_s = welcome.heartbeat_s
            self.registered.set()
            return

    def _reregister(self) -> None:
        if self.registered is not None:
            self.registered.clear()  # now, so nobody mistakes the old registration for a new one
        if self._registering is None or self._registering.done():
            self._registering = self._tasks.spawn(self._register_again(), "register")

    async def _register_again(self) -> None:
        # Every peer of a restarted broker learns of it within the same heartbeat: spread their Hellos
        # (and what on_reconnect asks again) over up to one interval rather than answer in a burst.
        await asyncio.sleep(random.uniform(0, min(self.heartbeat_s, 1.0)))
        await self._register(None)
        # Asks in flight went to the broker that died, or their replies did: send them again now
        # rather than after their timeouts. Every ask atelier makes is safe to repeat (a submit's
        # job id makes a repeat return the same job).
        for _, future in list(self._pending.values()):
            if not future.done():
                future.set_result(_RESEND)
        await self.on_reconnect()

    async def _receive_loop(self) -> None:
        while True:
            assert self._sock is not None
            frames = await self._sock.recv_multipart(copy=False)
            self._last_heard = time.monotonic()
            try:
                env = codec.decode(frames)
            except DecodeError as exc:
                await self._refuse(exc)
                continue
            asked, future = self._pending.get(env.corr, (None, None)) if env.corr is not None else (None, None)
            # A reply counts only from whom we asked, or from the broker about them: ids are small
            # counters, so any peer could otherwise guess one and answer in their place.
            if future is not None and env.src in (asked, BROKER):
                if not future.done():
                    future.set_result(env.msg)
                continue
            if isinstance(env.msg, Heartbeat):
                continue
            if isinstance(env.msg, Error) and env.msg.code is ErrorCode.not_registered and env.src == BROKER:
                # The broker restarted and forgot us: register again, out of the mailbox's way.
                self._reregister()
                continue
            if isinstance(env.msg, Error) and env.msg.code is ErrorCode.forbidden and env.src == BROKER:
                # Dropped (our key was revoked): say so; asking again says whether it still stands.
                log.warning("%s: the broker dropped us: %s", self.name, env.msg.message)
                self._reregister()
                continue
            if env.corr is not None:
                # A reply nobody waits for: to a tell, or to an ask that timed out.
                log.debug("%s: dropped a late %s reply from %s", self.name, env.msg.kind, env.src)
                continue
            self._mailbox.put_nowait(env)

    async def _refuse(self, exc: DecodeError) -> None:
        """Always send a reply, an error if need be: the sender learns which field was wrong."""
        if exc.src is None or exc.id is None:
            log.warning("%s: dropped an undecodable message: %s", self.name, exc)
            return
        code = ErrorCode.too_large if exc.too_large else ErrorCode.bad_request
        with contextlib.suppress(zmq.ZMQError):
            await self.send(exc.src, Error(code=code, message=str(exc), field=exc.field), corr=exc.id)

    async def _mailbox_loop(self) -> None:
        while True:
            env = await self._mailbox.get()
            try:
                await self._deliver(env)
            except Exception:  # e.g. the reply could not be sent; the mailbox must go on
                log.exception("%s: failed to deliver %s", self.name, env.msg.kind)
            finally:
                self._mailbox.task_done()

    async def _deliver(self, env: Envelope) -> None:
        handler = self._handlers.get(type(env.msg))
        if handler is None:
            if env.corr is None and not isinstance(env.msg, Error):
                await self.reply(env, Error(code=ErrorCode.unsupported,
                                            message=f"{self.role.value} does not handle {env.msg.kind!r}"))
            else:
                log.warning("%s: no handler for %s from %s", self.name, env.msg.kind, env.src)
            return
        try:
            answer = await handler(self, env.msg, env)
        except Exception as exc:  # one bad message must never take the actor down
            log.exception("%s: handler for %s failed", self.name, env.msg.kind)
            answer = internal_error(self.name, env.msg.kind, exc)
        if answer is not None:
            await self.reply(env, answer)

    async def _liveness_loop(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s / 4)
            now = time.monotonic()
            if self.registered is not None and self.registered.is_set() \
                    and now - self._last_heard > MISSED_HEARTBEATS * self.heartbeat_s:
                log.warning("%s: lost the broker; registering again", self.name)
                self._reregister()
                continue
            if now - self._last_sent >= self.heartbeat_s:
                with contextlib.suppress(zmq.ZMQError):
                    await self.send(BROKER, Heartbeat())
