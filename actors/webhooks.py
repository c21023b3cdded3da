"""Cluster events to webhooks ([events] webhooks): each event a POST of its JSON to the programs that asked.

The scheduler hands every ``ClusterEvent`` to ``Webhooks.send``, which only queues it: each hook has a
queue and a task of its own, so a slow or dead hook delays nobody, neither the scheduler's mailbox nor
the other hooks. A hook's queue is bounded ([events] queue): past it, the oldest event goes (a log line
and the ``webhook_dropped`` counter say so), since for a program that waits for the GPU the newest word
is the one that matters.

A POST is the event's JSON, ``{"event": "queue_idle", "at": 1764680000.0, "detail": {...}}``, the same as
``GET /v1/events`` streams, with ``X-Atelier-Event: <event>`` and, where the hook has a secret,
``X-Atelier-Signature: sha256=<hex>``: the HMAC-SHA256 of the body's bytes under the secret (GitHub's
scheme), so the hook can tell atelier's POSTs from anyone else's and, by ``at``, a replay of an old one.
A failed POST (no connection, a timeout, a 5xx or 429) is tried again ``retries`` times with backoff;
other refusals (a 4xx) are the hook's answer, and are not.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import hmac
import json
import logging
import time
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from actors.messages import ClusterEvent, ClusterEventKind
from atelier.config import EventsConfig, Webhook

if TYPE_CHECKING:
    import aiohttp

log = logging.getLogger("atelier.webhooks")

SIGNATURE_HEADER = "X-Atelier-Signature"
EVENT_HEADER = "X-Atelier-Event"
BACKOFF_S = 0.5  # before the first retry; doubled for each one after
DROP_LOG_S = 10.0  # at most one log line per hook this often about dropped events (with the count)
CLOSE_S = 2.0  # at stop, what is queued has this long to go out before the rest is dropped


def body_of(event: ClusterEvent) -> bytes:
    """The JSON a hook (and ``GET /v1/events``) gets for an event: its kind, when, and its detail."""
    data = {"event": event.event.value, "at": event.at, "detail": event.detail}
    return json.dumps(data, separators=(",", ":")).encode()


def signature(secret: str, body: bytes) -> str:
    """The X-Atelier-Signature header's value for ``body``: what a hook recomputes to check it."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def _shown(url: str) -> str:
    """A hook's address for the log: no credentials or query string, which may hold a token."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}{parts.path}"


class WebhookConfigError(ValueError):
    pass


class _Hook:
    """One hook's queue, and the task that empties it in order."""

    def __init__(self, settings: Webhook, queue: int):
        self.settings = settings
        self.url = settings.url
        self.shown = _shown(settings.url)
        self.wants = frozenset(ClusterEventKind(name) for name in settings.events)
        self.queue: collections.deque[ClusterEvent] = collections.deque()
        self.limit = queue
        self.ready = asyncio.Event()  # something is queued
        self.idle = asyncio.Event()  # nothing is queued or on its way
        self.task: asyncio.Task | None = None
        self.dropped_unlogged = 0
        self.logged_at = float("-inf")


class Webhooks:
    """Every configured hook; ``send`` queues an event for those that want it, ``close`` ends them."""

    def __init__(self, settings: EventsConfig, *, backoff_s: float = BACKOFF_S):
        known = {kind.value for kind in ClusterEventKind}
        for index, hook in enumerate(settings.webhooks):
            unknown = sorted(set(hook.events) - known)
            if unknown:
                raise WebhookConfigError(f"[events] webhooks[{index}] ({_shown(hook.url)}): no event "
                                         f"{', '.join(map(repr, unknown))}; the events are "
                                         f"{', '.join(sorted(known))} (or leave events out for all)")
        self.hooks = [_Hook(hook, settings.queue) for hook in settings.webhooks]
        self.backoff_s = backoff_s
        self.sent = self.failed = self.dropped = 0
        self._session: aiohttp.ClientSession | None = None
        self._closing = False

    def stats(self) -> dict[str, int]:
        """The counters, as SchedulerStats' fields (for /metrics)."""
        return {"webhook_sent": self.sent, "webhook_failed": self.failed, "webhook_dropped": self.dropped}

    def send(self, event: ClusterEvent) -> None:
        """Queues ``event`` for every hook that wants it; never waits (call from the event loop)."""
        if self._closing:
            return
        for hook in self.hooks:
            if hook.wants and event.event not in hook.wants:
                continue
            if len(hook.queue) >= hook.limit:
                hook.queue.popleft()
                self.dropped += 1
                self._log_drop(hook)
            hook.queue.append(event)
            hook.idle.clear()
            hook.ready.set()
            if hook.task is None:
                hook.task = asyncio.get_running_loop().create_task(self._deliver_all(hook),
                                                                   name=f"webhook-{hook.shown}")

    def _log_drop(self, hook: _Hook) -> None:
        hook.dropped_unlogged += 1
        now = time.monotonic()
        if now - hook.logged_at < DROP_LOG_S:
            return
        log.warning("webhook %s is not keeping up: %d event(s) dropped unsent, the oldest first (its queue holds "
                    "%d; [events] queue)", hook.shown, hook.dropped_unlogged, hook.limit)
        hook.logged_at, hook.dropped_unlogged = now, 0

    async def _deliver_all(self, hook: _Hook) -> None:
        while True:
            while not hook.queue:
                hook.idle.set()
                hook.ready.clear()
                await hook.ready.wait()
            event = hook.queue.popleft()  # in flight: no longer the queue's to drop
            try:
                delivered = await self._deliver(hook, event)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must not end the hook's task: this event is given up, the next goes
                log.exception("webhook %s: delivering %s failed", hook.shown, event.event.value)
                delivered = False
            if delivered:
                self.sent += 1
            else:
                self.failed += 1

    async def _deliver(self, hook: _Hook, event: ClusterEvent) -> bool:
        import aiohttp

        body = body_of(event)
        headers = {"Content-Type": "application/json", EVENT_HEADER: event.event.value,
                   "User-Agent": "atelier-webhooks"}
        if hook.settings.secret is not None:
            headers[SIGNATURE_HEADER] = signature(hook.settings.secret.get_secret_value(), body)
        if self._session is None:
            self._session = aiohttp.ClientSession()
        timeout = aiohttp.ClientTimeout(total=hook.settings.timeout_s)
        attempts = hook.settings.retries + 1
        for attempt in range(1, attempts + 1):
            try:
                async with self._session.post(hook.url, data=body, headers=headers, timeout=timeout,
                                              allow_redirects=False) as response:
                    if response.status < 300:
                        return True
                    problem = f"HTTP {response.status}"
                    if response.status < 500 and response.status != 429:  # the hook's answer: asking again changes
                        log.warning("webhook %s refused %s: %s", hook.shown, event.event.value, problem)
                        return False
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                problem = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            if attempt == attempts or self._closing:
                log.warning("webhook %s: %s not delivered after %d tries (%s)", hook.shown, event.event.value,
                            attempt, problem)
                return False
            await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1))
        return False

    async def close(self, timeout: float = CLOSE_S) -> None:
        """Lets what is queued go out for up to ``timeout`` seconds (no more retries), then ends every
        hook's task and the HTTP session."""
        self._closing = True
        tasks = [hook.task for hook in self.hooks if hook.task is not None]
        busy = [hook.idle.wait() for hook in self.hooks if hook.task is not None]
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.gather(*busy), timeout)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        left = sum(len(hook.queue) for hook in self.hooks)
        if left:
            log.warning("webhooks: %d event(s) still queued at stop were not sent", left)
        if self._session is not None:
            await self._session.close()
            self._session = None
