"""The one async client every frontend uses: submit, stream events, wait, cancel, query.

It is an actor (a DEALER registered with the broker as a frontend) plus a SUB
socket on the broker's XPUB for a job's events. It subscribes to a job's topic
before submitting it, and the job's final ``JobResult`` arrives on the routed
path, so a lost event never loses a result.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import zmq
import zmq.asyncio

from actors import codec
from actors.actor import Actor, RemoteError, connect, handles
from actors.codec import SCHEDULER, DecodeError, Envelope
from actors.messages import (
    CancelJob,
    ClusterEvent,
    ClusterStatus,
    DeleteLora,
    EndLease,
    Error,
    GetJob,
    GetModels,
    GetResult,
    GetStatus,
    JobEvent,
    JobResult,
    ListJobs,
    ListLeases,
    ListLoras,
    ModelInfo,
    Preview,
    Progress,
    Role,
    ShareLora,
    Submit,
    TakeLease,
)
from atelier.jobs import ErrorCode, JobInputs, JobRecord, JobSpec, Lease, LoraInfo

log = logging.getLogger("atelier.client")

KEEP_RESULTS = 1000
# Results carry every output's bytes (videos, many large PNGs): the cache is bounded by their size too.
KEEP_RESULT_BYTES = 256 << 20
# A job watched this long with no result is asked after (its JobResult may have been dropped on the
# way: a peer restarting, a full queue); at most RESYNC_BATCH of them each time, the oldest first.
RESYNC_S = 15.0
RESYNC_BATCH = 64
# After a reconnect every watched job is asked after, RESYNC_BATCH at a time, each batch after a random
# pause of up to this long: many clients coming back at once do not all ask the scheduler together.
RECONNECT_JITTER_S = 1.0

Event = JobEvent | Progress | Preview | JobResult

__all__ = ["AtelierClient", "RemoteError", "Event"]


@dataclass
class _Watch:
    result: asyncio.Future | None = None
    # What came since the job was watched, for its first reader; every later reader gets its own queue
    # from the moment it starts reading, so several readers of one job each see its events and result.
    backlog: asyncio.Queue | None = field(default_factory=asyncio.Queue)
    readers: list[asyncio.Queue] = field(default_factory=list)
    subscribed: bool = False
    checked: float = field(default_factory=time.monotonic)  # when it was last known to be in hand or asked after

    def put(self, item: Event) -> None:
        for queue in self.readers if self.backlog is None else [self.backlog, *self.readers]:
            queue.put_nowait(item)

    def reader(self) -> asyncio.Queue:
        queue, self.backlog = self.backlog or asyncio.Queue(), None
        self.readers.append(queue)
        return queue


def _size(result: JobResult) -> int:
    return sum(len(output.data) for output in result.outputs)


class AtelierClient(Actor):
    role = Role.frontend

    def __init__(self, router: str, pub: str, *, name: str | None = None, heartbeat_s: float = 1.0,
                 keep_result_bytes: int = KEEP_RESULT_BYTES, **kwargs):
        super().__init__(name or f"client-{uuid.uuid4().hex[:12]}", router, heartbeat_s=heartbeat_s, **kwargs)
        self.pub = pub
        self.keep_result_bytes = keep_result_bytes
        self._sub: zmq.asyncio.Socket | None = None
        self._watches: dict[str, _Watch] = {}
        self._results: OrderedDict[str, JobResult] = OrderedDict()
        self._result_bytes = 0
        self._cluster_readers: list[asyncio.Queue[ClusterEvent]] = []

    async def __aenter__(self) -> "AtelierClient":
        await self.start()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    async def start(self, timeout: float = 30.0) -> None:
        self._sub = self.ctx.socket(zmq.SUB)
        if self.keys is not None:
            self.keys.apply(self._sub)  # the broker's events socket lets in only keyed peers too
        self._sub.setsockopt(zmq.RCVHWM, 100_000)
        connect(self._sub, self.pub)
        await super().start(timeout)
        self._tasks.spawn(self._event_loop(), "events")
        self._tasks.spawn(self._resync_loop(), "resync")

    async def close(self, drain_timeout: float = 2.0) -> None:
        if self._sub is not None:
            self._sub.close(linger=0)
            self._sub = None
        await super().close(drain_timeout)

    # -- API --------------------------------------------------------------- #

    async def submit(self, spec: JobSpec, timeout: float = 10.0, attempts: int = 3,
                     events: bool = True, inputs: JobInputs | None = None,
                     idempotency_key: str | None = None) -> JobRecord:
        """Queues a job; raises RemoteError (with the offending field) if the scheduler refuses it.

        With ``events`` the job's state, progress and previews are subscribed to before it is
        sent, so none is missed; a caller that only wants the result saves that traffic.

        A submit lost in flight (the broker restarting, say) is sent again with the same job id;
        the scheduler answers a repeat from the same client with the job it already has, so a
        retry never makes a second job. ``idempotency_key`` extends that to retries from anywhere (a
        restarted client, another frontend process): the same user and key get the same job, even
        one that ended long ago. The returned record's job id is then that job's.

        A job id this client already watches (another caller's job, say) keeps its watch whatever
        this submit's fate: a refused submit never takes another job's events or result away. A job
        of another user is never this caller's: that answer is refused here too, with ``conflict``.
        """
        watched = self._watches.get(spec.id)
        if watched is None:
            self._watch(spec.id, subscribe=events)
        elif events and not watched.subscribed:
            self._subscribe(spec.id, watched)
        try:
            for attempt in range(attempts):
                try:
                    accepted = await self.ask(SCHEDULER, Submit(job=spec, inputs=inputs,
                                                                idempotency_key=idempotency_key), timeout)
                    break
                except asyncio.TimeoutError:
                    if attempt == attempts - 1:
                        raise
                    log.warning("no answer to submitting %s; sending it again", spec.id)
        except BaseException:
            if watched is None:
                self._unwatch(spec.id)
            raise
        job = accepted.job
        if job.spec.user != spec.user:
            # A scheduler that answers a known id with its job, whoever asks: that is another user's.
            if watched is None:
                self._unwatch(spec.id)
            raise RemoteError(Error(code=ErrorCode.conflict, field="id",
                                    message=f"job id {spec.id!r} is taken; leave the id out to get a new one"))
        if job.spec.id != spec.id:  # the job an earlier submit with this idempotency key made
            if watched is None:
                self._unwatch(spec.id)
            if job.spec.id not in self._watches and job.spec.id not in self._results:
                self._watch_known(job.spec.id, subscribe=events)  # it may have ended already
        return job

    async def events(self, job_id: str, timeout: float | None = None) -> AsyncIterator[Event]:
        """Yields the job's events in arrival order, ending with its JobResult. The first reader also
        gets what came since the submit; a later one, what comes from when it starts."""
        if job_id in self._results:
            yield self._results[job_id]
            return
        watch = self._watches.get(job_id) or self._watch_known(job_id)
        if not watch.subscribed:
            self._subscribe(job_id, watch)  # late: events already sent are gone, the result is not
        queue = watch.reader()
        try:
            while True:
                item = await asyncio.wait_for(queue.get(), timeout)
                yield item
                if isinstance(item, JobResult):
                    return
        finally:
            with contextlib.suppress(ValueError):
                watch.readers.remove(queue)

    async def wait(self, job_id: str, timeout: float | None = None) -> JobResult:
        if job_id in self._results:
            return self._results[job_id]
        watch = self._watches.get(job_id) or self._watch_known(job_id, subscribe=False)
        assert watch.result is not None
        return await asyncio.wait_for(asyncio.shield(watch.result), timeout)

    async def generate(self, spec: JobSpec, timeout: float | None = None) -> JobResult:
        """Submits and waits for the result, without streaming events."""
        await self.submit(spec, events=False)
        return await self.wait(spec.id, timeout)

    def result(self, job_id: str) -> JobResult | None:
        """The result of one of this client's jobs, if it has come and is still kept."""
        return self._results.get(job_id)

    def forget(self, job_id: str) -> None:
        """Stops following a job (its events): for a job another frontend submitted, whose result
        never comes here."""
        self._unwatch(job_id)

    async def cancel(self, job_id: str) -> JobRecord:
        info = await self.ask(SCHEDULER, CancelJob(job_id=job_id))
        return info.job

    async def job(self, job_id: str) -> JobRecord:
        info = await self.ask(SCHEDULER, GetJob(job_id=job_id))
        return info.job

    async def jobs_of(self, user: str, limit: int = 100) -> list[JobRecord]:
        """The user's jobs the scheduler still remembers, newest first."""
        listed = await self.ask(SCHEDULER, ListJobs(user=user, limit=limit))
        return listed.jobs

    async def status(self) -> ClusterStatus:
        status = await self.ask(SCHEDULER, GetStatus())
        return status

    async def models(self, user: str | None = None) -> list[ModelInfo]:
        """The catalog; with ``user``, each model also lists the LoRAs that user trained or was lent for it."""
        models = await self.ask(SCHEDULER, GetModels(user=user))
        return models.models

    async def loras(self, user: str) -> list[LoraInfo]:
        """The trained LoRAs ``user`` may apply: their own, then those shared with them."""
        return (await self.ask(SCHEDULER, ListLoras(user=user))).loras

    async def delete_lora(self, user: str, name: str) -> list[LoraInfo]:
        return (await self.ask(SCHEDULER, DeleteLora(user=user, name=name))).loras

    async def share_lora(self, user: str, name: str, users: list[str]) -> list[LoraInfo]:
        return (await self.ask(SCHEDULER, ShareLora(user=user, name=name, users=users))).loras

    async def take_lease(self, device: str | None, nbytes: int, ttl_s: float, *, node: str | None = None,
                         urgent: bool = False, holder: str = "", wait_s: float = 120.0) -> Lease:
        """Borrows ``nbytes`` of device memory on ``device`` (None: every device of ``node``) for at most ``ttl_s``;
        returns the granted lease. Raises RemoteError saying why not. The lease ends with ``end_lease``, at
        ``ttl_s``, or when this client goes away. ``frontends/vram.py`` wraps this for other programs."""
        info = await self.ask(SCHEDULER, TakeLease(device=device, node=node, bytes=nbytes, ttl_s=ttl_s, urgent=urgent,
                                                   holder=holder, wait_s=wait_s), timeout=wait_s + 10.0)
        return info.lease

    async def end_lease(self, lease_id: str) -> Lease:
        return (await self.ask(SCHEDULER, EndLease(id=lease_id))).lease

    async def leases(self) -> list[Lease]:
        """The leases pending and granted, then the last ended ones."""
        return (await self.ask(SCHEDULER, ListLeases())).leases

    # -- plumbing ------------------------------------------------------------ #

    def _watch(self, job_id: str, subscribe: bool = True) -> _Watch:
        watch = _Watch(result=asyncio.get_running_loop().create_future())
        self._watches[job_id] = watch
        if subscribe:
            self._subscribe(job_id, watch)
        return watch

    def _watch_known(self, job_id: str, subscribe: bool = True) -> _Watch:
        """A watch on a job this client did not just submit: one submitted before a restart, or by
        another process. It may have ended already, its result sent elsewhere: ask for it."""
        watch = self._watch(job_id, subscribe)
        self._catch_up([job_id])
        return watch

    def _catch_up(self, job_ids: list[str]) -> None:
        """Asks the scheduler for the results of jobs that may have ended unseen; each one that has
        comes in through ``on_result``, as if sent, and shows once."""
        for job_id in job_ids:
            self._tasks.spawn(self._fetch_quietly(job_id), f"fetch-{job_id}")

    async def _fetch_quietly(self, job_id: str) -> None:
        try:
            await self.fetch_result(job_id)
        except (RemoteError, asyncio.TimeoutError) as exc:
            log.info("could not fetch the result of %s yet: %s", job_id, exc)

    async def fetch_result(self, job_id: str) -> JobResult | None:
        """The job's result from the scheduler (shown through the job's watch if it has not been),
        or None while it runs. Raises RemoteError for a job the scheduler does not know."""
        reply = await self.ask(SCHEDULER, GetResult(job_id=job_id))
        if isinstance(reply, JobResult):
            await self.on_result(reply, None)
            return reply
        return None

    async def _resync_loop(self) -> None:
        """At-least-once delivery, the client's half: results that never came are asked for."""
        while True:
            await asyncio.sleep(RESYNC_S / 3)
            now = time.monotonic()
            stale = sorted((w.checked, job_id) for job_id, w in self._watches.items() if now - w.checked > RESYNC_S)
            for _, job_id in stale[:RESYNC_BATCH]:
                self._watches[job_id].checked = now
            self._catch_up([job_id for _, job_id in stale[:RESYNC_BATCH]])

    async def on_reconnect(self) -> None:
        # A JobResult sent while the broker was restarting is gone; the scheduler still has it.
        self._tasks.spawn(self._resync_all(list(self._watches)), "resync-all")

    async def _resync_all(self, job_ids: list[str]) -> None:
        """Asks after every job in ``job_ids`` that is still watched, a bounded batch at a time."""
        for start in range(0, len(job_ids), RESYNC_BATCH):
            await asyncio.sleep(random.uniform(0, RECONNECT_JITTER_S))
            batch = [job_id for job_id in job_ids[start:start + RESYNC_BATCH] if job_id in self._watches]
            now = time.monotonic()
            for job_id in batch:
                self._watches[job_id].checked = now
            await asyncio.gather(*(self._fetch_quietly(job_id) for job_id in batch))

    async def cluster_events(self) -> AsyncIterator[ClusterEvent]:
        """The cluster's events (queue busy and idle, leases, operator actions) from now on, for as long as
        the caller reads. Lossy like every event: what must be known for sure is asked (``status``)."""
        assert self._sub is not None
        queue: asyncio.Queue[ClusterEvent] = asyncio.Queue(maxsize=1000)
        if not self._cluster_readers:
            self._sub.setsockopt_string(zmq.SUBSCRIBE, "cluster/")
        self._cluster_readers.append(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            self._cluster_readers.remove(queue)
            if not self._cluster_readers and self._sub is not None:
                with contextlib.suppress(zmq.ZMQError):
                    self._sub.setsockopt_string(zmq.UNSUBSCRIBE, "cluster/")

    def _subscribe(self, job_id: str, watch: _Watch) -> None:
        assert self._sub is not None
        self._sub.setsockopt_string(zmq.SUBSCRIBE, f"job/{job_id}/")
        watch.subscribed = True

    def _unwatch(self, job_id: str) -> None:
        watch = self._watches.pop(job_id, None)
        if watch is not None and watch.subscribed and self._sub is not None:
            with contextlib.suppress(zmq.ZMQError):
                self._sub.setsockopt_string(zmq.UNSUBSCRIBE, f"job/{job_id}/")

    @handles(JobResult)
    async def on_result(self, msg: JobResult, env: Envelope | None) -> None:
        job_id = msg.job.spec.id
        if env is not None and env.src != SCHEDULER:
            return  # another peer's word on a job is not a result
        if job_id not in self._results:
            self._keep(job_id, msg)
        # The job's story ends here: its consumers hold the watch, nobody needs the topic. A result
        # sent again (delivery is at least once) or fetched as well finds no watch: shown once. One
        # that does was watched anew since (a retried submit of an ended job): it is its first.
        watch = self._watches.get(job_id)
        self._unwatch(job_id)
        if watch is None:
            return
        watch.put(msg)
        if watch.result is not None and not watch.result.done():
            watch.result.set_result(msg)

    def _keep(self, job_id: str, result: JobResult) -> None:
        """Kept for a while, so a caller that starts waiting late still gets it: the newest ones, within
        KEEP_RESULTS and ``keep_result_bytes`` (the newest always, however large)."""
        self._results[job_id] = result
        self._result_bytes += _size(result)
        while len(self._results) > 1 and (len(self._results) > KEEP_RESULTS
                                          or self._result_bytes > self.keep_result_bytes):
            _, dropped = self._results.popitem(last=False)
            self._result_bytes -= _size(dropped)

    async def _event_loop(self) -> None:
        assert self._sub is not None
        while True:
            frames = await self._sub.recv_multipart(copy=False)
            try:
                event = codec.decode(frames[1:]).msg
            except DecodeError as exc:
                log.warning("dropped an undecodable event: %s", exc)
                continue
            if isinstance(event, ClusterEvent):
                for queue in self._cluster_readers:
                    with contextlib.suppress(asyncio.QueueFull):  # a reader that stopped reading misses some
                        queue.put_nowait(event)
                continue
            watch = self._watches.get(getattr(event, "job_id", ""))
            if watch is not None:
                watch.checked = time.monotonic()  # alive and heard of: no need to ask after it
                watch.put(event)

