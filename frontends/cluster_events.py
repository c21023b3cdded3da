"""The cluster's events over HTTP, and who the caller is: ``GET /v1/events`` and ``GET /v1/me``.

``GET /v1/events`` (admins) is a Server-Sent Events stream of every ``ClusterEvent`` from the moment it
opens (the queue going busy and idle, leases granted and ended, an operator's pause, drain or catalog
reload), one ``data: {"event", "at", "detail"}`` line each, the same JSON a webhook is POSTed
(actors/webhooks.py). A comment (``: connected``) opens it, once the server is subscribed, and another
every KEEPALIVE_S keeps proxies from closing an idle stream. Events are lossy like every event: a
program that must know for sure asks (``GET /v1/jobs?all=1``, ``GET /v1/nodes``).

``GET /v1/me`` says whom the caller's token names and whether they are an admin: what the web page
asks to know whether to show its admin view.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiohttp import web
from pydantic import BaseModel, Field

from actors.webhooks import body_of
from frontends import api
from frontends.httpbase import Caller, Problem, Surface, admin_only, json_response

log = logging.getLogger("atelier.http")

KEEPALIVE_S = 15.0  # a comment this often on an idle stream, so proxies keep it open
WRITE_TIMEOUT_S = 30.0  # a reader that takes no bytes this long is dropped: nothing waits on it


class Me(BaseModel):
    """``GET /v1/me``: the user the caller's token names, and their role."""

    user: str
    admin: bool = Field(description="may see and act on every job, the runners and the cluster's events")


class ClusterEventView(BaseModel):
    """One ``data:`` line of ``GET /v1/events``, and the body of a webhook's POST."""

    event: str = Field(description="queue_busy, queue_idle, lease_granted, lease_ended, paused, resumed, "
                                   "node_draining, node_drained, node_resumed, catalog_reloaded")
    at: float = Field(description="the scheduler's clock, seconds since the epoch")
    detail: dict[str, str | int | float | bool | None] = Field(
        description="what a program needs to act on it: counts, a device, bytes, a model, a node")


class EventsSurface(Surface):
    paths = ("/v1/events", "/v1/me")

    def __init__(self, gateway):
        super().__init__(gateway)
        self._open: set[asyncio.Task] = set()  # the streams' handlers, ended at shutdown

    async def close(self) -> None:
        """Ends every stream: a reader that left without a word holds its handler until a write fails (at
        the next keep-alive), and the server would wait for it on the way down."""
        for task in list(self._open):
            task.cancel()

    def routes(self) -> list[web.AbstractRouteDef]:
        return [web.get("/v1/events", self.stream), web.get("/v1/me", self.me)]

    def render(self, problem: Problem) -> tuple[BaseModel, int]:
        return api.ApiError(error=api.ErrorBody(code=problem.code, message=problem.message, field=problem.field,
                                                problems=problem.problems, retry_after_s=problem.retry_after_s)), \
            problem.status

    async def me(self, request: web.Request) -> web.Response:
        caller: Caller = request["caller"]
        return json_response(Me(user=caller.user, admin=caller.admin))

    async def stream(self, request: web.Request) -> web.StreamResponse:
        caller = admin_only(request, "read the cluster's events")
        with self.gateway.hold(caller):
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                                   "X-Accel-Buffering": "no"})
            await response.prepare(request)
            task = asyncio.current_task()
            assert task is not None
            self._open.add(task)
            try:
                await self._relay(response)
            except asyncio.TimeoutError:  # the reader stopped reading: its connection goes
                log.info("dropping a cluster event stream: its reader took nothing for %.0f s", WRITE_TIMEOUT_S)
                if request.transport is not None:
                    request.transport.close()
            except ConnectionError as exc:  # the reader left; the headers are out, so the stream just ends
                log.info("a cluster event stream ended: %s", exc)
            finally:
                self._open.discard(task)
            return response

    async def _relay(self, response: web.StreamResponse) -> None:
        events = self.gateway.client.cluster_events()
        # The next event is one task, waited on with a timeout for the keep-alive: a timeout on the
        # generator's own __anext__ would cancel it, and with it the subscription.
        upcoming = asyncio.ensure_future(anext(events))
        try:
            await asyncio.sleep(0)  # the task's first step (subscribing) runs before "connected" is said
            await _write(response, b": connected\n\n")
            while True:
                done, _ = await asyncio.wait({upcoming}, timeout=KEEPALIVE_S)
                if not done:
                    await _write(response, b": keep-alive\n\n")
                    continue
                event = upcoming.result()
                upcoming = asyncio.ensure_future(anext(events))
                await _write(response, b"data: " + body_of(event) + b"\n\n")
        finally:
            upcoming.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await upcoming
            await events.aclose()


async def _write(response: web.StreamResponse, data: bytes) -> None:
    await asyncio.wait_for(response.write(data), WRITE_TIMEOUT_S)
