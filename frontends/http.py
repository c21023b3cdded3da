"""atelier's HTTP server: the native API, the OpenAI, AUTOMATIC1111 and ComfyUI APIs, a live event stream,
Prometheus metrics and the web page, in one aiohttp process.

It is a frontend like the CLI: every request goes through one ``AtelierClient`` to the
scheduler, so the HTTP server holds no queue and no job state of its own beyond what it relays.

- Native (``/v1/jobs`` …): submit a ``JobSpec``, read, list, cancel; ``/v1/jobs/{id}/events``
  streams the job's state, progress and preview frames as Server-Sent Events.
- The APIs existing clients speak, each a ``Surface`` of its own module (``openai_images``,
  ``a1111``, ``comfy``), answered in those APIs' own shapes, so existing clients work unchanged;
  they submit through this server's one path, so everything below applies to them as well.
- Bearer tokens from the config name the user a request acts for (atelier's fair share is per
  user) and their role: a user sees only their own jobs, artifacts and streams; an admin sees and
  cancels all. A bind beyond loopback refuses to start without tokens. Jobs are rate limited per user.
  With no tokens (loopback only) the one local user is admin-equivalent, and the Host, Origin and
  Content-Type checks keep other sites' pages out.
- ``/metrics`` (Prometheus), ``/openapi.json`` (generated from the same pydantic models that
  validate the requests), and the web page at ``/``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hmac
import json
import logging
import re
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from actors.actor import RemoteError
from actors.keys import for_peer
from actors.messages import ClusterStatus, JobEvent, JobResult, Preview, Progress
from atelier.artifacts import S3Store, StoreError, media_type_for
from atelier.config import Config, HttpConfig
from atelier.jobs import ErrorCode, JobInputs, JobRecord, JobSpec, Priority
from atelier.runtime import READY_PREFIX, Failure, TaskSet, process_main, process_parser
from frontends import api, metrics
from frontends.a1111 import A1111Surface
from frontends.catalog_follow import follow_catalog
from frontends.client import AtelierClient
from frontends.cluster_events import EventsSurface
from frontends.comfy import ComfySurface
from frontends.httpbase import (
    Caller,
    Problem,
    Surface,
    from_remote,
    job_id_of,
    json_response,
    parse,
    query_flag,
    query_int,
    read_json,
)
from frontends.jobcache import JobCache
from frontends.leases import LeaseSurface
from frontends.openai_images import OpenAISurface
from frontends.operator import OperatorSurface
from frontends.trainings import TrainingSurface

log = logging.getLogger("atelier.http")

LOOPBACK = {"127.0.0.1", "::1", "localhost"}
WEB_ROOT = Path(__file__).resolve().parent / "web"
SYNC_TIMEOUT_S = 600.0  # the OpenAI and A1111 calls wait for their images this long at most
KEEPALIVE_S = 15.0  # an SSE comment this often, so proxies keep an idle stream open
WRITE_TIMEOUT_S = 30.0  # an event stream whose reader takes no bytes this long is dropped
STATUS_TTL_S = 1.0  # /v1/nodes and /metrics share one ClusterStatus this long: a flood asks the scheduler once
JSON_BODY_BYTES = 1 << 20  # a body that is only JSON settings
IMAGE_BODY_BYTES = 64 << 20  # a body that carries input images in base64
UNSAFE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
WILDCARD_HOSTS = {"", "0.0.0.0", "::"}
ARTIFACT_NAME = re.compile(r"^(?P<job>[A-Za-z0-9_-]{1,64})-(?P<index>\d{1,6})\.[a-z0-9]{1,8}$")


class RateLimiter:
    """A token bucket per user: ``rate`` jobs a minute, in a burst of up to as many.

    A bucket that has filled up again is what a new one would be, so it is forgotten; and at most
    ``MAX_BUCKETS`` are kept (the least recently used go first), however many names requests bring.
    """

    MAX_BUCKETS = 10_000
    SWEEP_S = 60.0

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._buckets: OrderedDict[str, tuple[float, float, int]] = OrderedDict()  # user -> (tokens, when, rate)
        self._swept = clock()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, user: str, rate_per_minute: int) -> float:
        """Takes one job's worth; returns 0, or the seconds until one is there (nothing taken)."""
        now = self.clock()
        tokens = self._tokens(self._buckets.pop(user, None), rate_per_minute, now)
        wait = 0.0
        if tokens < 1.0:
            wait = (1.0 - tokens) * 60.0 / rate_per_minute
        else:
            tokens -= 1.0
        self._buckets[user] = (tokens, now, rate_per_minute)
        self._sweep(now)
        return wait

    @staticmethod
    def _tokens(bucket: tuple[float, float, int] | None, rate_per_minute: int, now: float) -> float:
        if bucket is None:
            return float(rate_per_minute)
        tokens, then, _ = bucket
        return min(float(rate_per_minute), tokens + (now - then) * rate_per_minute / 60.0)

    def _sweep(self, now: float) -> None:
        # Over the cap, the least recently used goes at once (O(1): a flood of new names must not make
        # every request scan them all); the scan for full buckets runs once a SWEEP_S.
        while len(self._buckets) > self.MAX_BUCKETS:
            self._buckets.popitem(last=False)
        if now - self._swept < self.SWEEP_S:
            return
        self._swept = now
        for user, bucket in list(self._buckets.items()):
            if self._tokens(bucket, bucket[2], now) >= bucket[2]:
                del self._buckets[user]


class LiveSessions:
    """The live sessions each user has open, the most recently used last: at most ``limit`` each.

    A new session takes the place of the one used longest ago (a tab closed without a word leaves
    its session behind); so that a fresh session per prompt cannot buy the live rate, the caller
    counts a new session's first prompt as an ordinary job."""

    MAX_USERS = RateLimiter.MAX_BUCKETS

    def __init__(self, limit: int):
        self.limit = limit
        self._open: OrderedDict[str, OrderedDict[str, None]] = OrderedDict()

    def is_open(self, user: str, session: str) -> bool:
        return session in self._open.get(user, ())

    def use(self, user: str, session: str) -> None:
        sessions = self._open.pop(user, None) or OrderedDict()
        self._open[user] = sessions
        sessions.pop(session, None)
        sessions[session] = None
        while len(sessions) > self.limit:
            sessions.popitem(last=False)
        while len(self._open) > self.MAX_USERS:
            self._open.popitem(last=False)


class _Listener:
    """One stream's events not yet written: at most the newest of each kind (a state, a progress, a
    preview), then the end. A reader that falls behind skips stale frames instead of pinning them, and
    the fan-out never waits for it."""

    def __init__(self):
        self._pending: list[Any] = []
        self._ready = asyncio.Event()

    def put(self, event: Any) -> None:
        if event is not None:
            self._pending = [e for e in self._pending if e is None or type(e) is not type(event)]
        self._pending.append(event)
        self._ready.set()

    async def get(self) -> Any:
        while not self._pending:
            self._ready.clear()
            await self._ready.wait()
        return self._pending.pop(0)


@dataclass
class _Followed:
    own: bool  # submitted here: its JobResult comes to us, after its last JobEvent
    listeners: set[_Listener] = field(default_factory=set)
    state: JobEvent | None = None
    progress: Progress | None = None
    preview: Preview | None = None
    ended: bool = False


class JobStreams:
    """Each job's events as this server sees them, fanned out to any number of listeners.

    One task per job reads the client's stream (the client allows one reader per job) and keeps
    the latest state, progress and preview, so a listener that comes late starts from them.
    """

    KEEP = 1000  # ended jobs remembered, for late listeners and A1111's /progress

    def __init__(self, client: AtelierClient, poll_cache_s: float = 2.0):
        self.client = client
        self.records = JobCache(fresh_s=poll_cache_s)  # what the events read here make of each job's record, for polls
        self._jobs: OrderedDict[str, _Followed] = OrderedDict()
        self._tasks = TaskSet("http-follow")

    def follow(self, job_id: str, *, own: bool) -> _Followed:
        followed = self._jobs.get(job_id)
        if followed is None:
            followed = self._jobs[job_id] = _Followed(own)
            self._tasks.spawn(self._read(job_id, followed), f"follow-{job_id}")
            if len(self._jobs) > self.KEEP:
                # The oldest ended ones go, past any still running: one long job must not hold the rest.
                for old in [j for j, f in self._jobs.items() if f.ended][: len(self._jobs) - self.KEEP]:
                    del self._jobs[old]
        return followed

    def latest(self, job_id: str) -> _Followed | None:
        return self._jobs.get(job_id)

    def subscribe(self, job_id: str, *, own: bool) -> _Listener:
        """The job's events from now on, after its latest progress and preview; None ends them."""
        followed = self.follow(job_id, own=own)
        queue = _Listener()
        for event in (followed.progress, followed.preview):
            if event is not None:
                queue.put(event)
        if followed.ended:
            queue.put(None)
        followed.listeners.add(queue)
        return queue

    def unsubscribe(self, job_id: str, queue: _Listener) -> None:
        followed = self._jobs.get(job_id)
        if followed is not None:
            followed.listeners.discard(queue)

    async def _read(self, job_id: str, followed: _Followed) -> None:
        try:
            async for event in self.client.events(job_id):
                if isinstance(event, JobEvent):
                    followed.state = event
                    self.records.event(event)
                elif isinstance(event, Progress):
                    followed.progress = event
                    self.records.event(event)
                elif isinstance(event, JobResult):
                    self.records.learned(event.job)
                elif isinstance(event, Preview):
                    followed.preview = event
                for queue in followed.listeners:
                    queue.put(event)
                # Another frontend's job: its result goes there; its last state is its end here.
                if isinstance(event, JobEvent) and event.state.terminal and not followed.own:
                    self.client.forget(job_id)
                    break
        except Exception:  # a lost stream ends its listeners; it must not end the server
            log.exception("following %s failed", job_id)
        finally:
            followed.ended = True
            for queue in followed.listeners:
                queue.put(None)

    async def close(self) -> None:
        await self._tasks.cancel_all()


class AccessLog(AbstractAccessLogger):
    """Method, path without its query, status and time: a token put in a URL never reaches the log."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info("%s %s %s %d %.1fms", request.remote, request.method, request.path, response.status,
                         time * 1000)


class HttpServer:
    def __init__(self, config: Config, client: AtelierClient, *, base_url: str, host: str | None = None):
        self.config = config
        self.settings: HttpConfig = config.http
        self.client = client
        self.base_url = base_url.rstrip("/")
        self.streams = JobStreams(client, config.http.poll_cache_s)
        self.limiter = RateLimiter()
        self.sessions = LiveSessions(self.settings.max_live_sessions)
        self.metrics = metrics.HttpMetrics()
        self._submitted: OrderedDict[str, None] = OrderedDict()  # job ids submitted here, newest last
        self._tokens = [(t.token.get_secret_value().encode(), t) for t in self.settings.tokens]
        self._hosts = _answered_hosts(host if host is not None else self.settings.host, self.settings.public_url)
        self._held: Counter[str] = Counter()  # user -> event streams and synchronous calls open
        self._status: asyncio.Future | None = None
        self._status_at = 0.0
        # The compatible APIs, each over this server's submit path (frontends/httpbase.py Surface).
        self.surfaces: list[Surface] = [OpenAISurface(self), A1111Surface(self), ComfySurface(self),
                                        TrainingSurface(self), LeaseSurface(self), OperatorSurface(self),
                                        EventsSurface(self)]
        # Outputs in S3 are fetched from S3 itself, by pre-signed GET URLs (signed here: no request).
        self.signer: S3Store | None = S3Store(config.store) if config.store.kind == "s3" else None
        self._image_routes = {"/v1/jobs"}.union(*(s.image_routes for s in self.surfaces))
        self._form_routes = set().union(*(s.form_routes for s in self.surfaces))
        self._untyped_json_routes = set().union(*(s.untyped_json_routes for s in self.surfaces))
        self.app = self._build()

    def _build(self) -> web.Application:
        app = web.Application(middlewares=[self._errors, self._guard, self._auth], client_max_size=IMAGE_BODY_BYTES)
        get, post, delete = web.get, web.post, web.delete
        app.add_routes([
            get("/", self.page), get("/openapi.json", self.openapi), get("/metrics", self.prometheus),
            post("/v1/jobs", self.create_job), get("/v1/jobs", self.list_jobs),
            get("/v1/jobs/{job_id}", self.get_job), delete("/v1/jobs/{job_id}", self.cancel_job),
            get("/v1/jobs/{job_id}/events", self.job_events), get("/v1/models", self.models),
            get("/v1/models/{model_id}", self.model),
            get("/v1/nodes", self.nodes), get("/v1/artifacts/{name}", self.artifact),
        ])
        for surface in self.surfaces:
            app.add_routes(surface.routes())
        if WEB_ROOT.is_dir():
            app.router.add_static("/static/", WEB_ROOT, show_index=False)
        app.on_shutdown.append(lambda _: asyncio.gather(*(surface.close() for surface in self.surfaces)))
        app.on_cleanup.append(lambda _: self.streams.close())
        return app

    def _surface(self, path: str) -> Surface | None:
        return next((surface for surface in self.surfaces if surface.owns(path)), None)

    # -- middleware ---------------------------------------------------------- #

    @web.middleware
    async def _errors(self, request: web.Request, handler) -> web.StreamResponse:
        started = time.monotonic()
        try:
            response = await handler(request)
        except Problem as problem:
            response = self._render(request, problem)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            # aiohttp's own refusals (no such route, wrong method) in the API's shape too.
            response = self._render(request, Problem(exc.status, exc.reason.lower().replace(" ", "_"),
                                                     f"{request.method} {request.path}: {exc.reason}"))
            if "Allow" in exc.headers:  # a 405 must say which methods the path has (RFC 9110)
                response.headers["Allow"] = exc.headers["Allow"]
        except asyncio.TimeoutError:
            response = self._render(request, Problem(503, "unavailable", "the scheduler did not answer in time",
                                                     retry_after_s=5.0))
        except RemoteError as exc:
            response = self._render(request, from_remote(exc))
        except Exception:  # a bug: said in the API's shape, the details only in the log
            log.exception("%s %s failed", request.method, request.path)
            response = self._render(request, Problem(500, "internal", "the server failed on this request; the "
                                                                      "operator's log has the details"))
        resource = request.match_info.route.resource
        self.metrics.observe(request.method, resource.canonical if resource else "unmatched", response.status,
                             time.monotonic() - started)
        return response

    def _render(self, request: web.Request, problem: Problem) -> web.Response:
        """The error in the shape of the API the request used."""
        surface = self._surface(request.path)
        if surface is not None:
            body, status = surface.render(problem)
        else:
            body = api.ApiError(error=api.ErrorBody(code=problem.code, message=problem.message, field=problem.field,
                                                    problems=problem.problems, retry_after_s=problem.retry_after_s))
            status = problem.status
        headers = {}
        if problem.retry_after_s is not None:
            headers["Retry-After"] = str(max(1, round(problem.retry_after_s)))
        if status == 401:
            headers["WWW-Authenticate"] = 'Bearer realm="atelier"'
        if isinstance(body, dict):
            return web.json_response(body, status=status, headers=headers)
        return json_response(body, status=status, headers=headers)

    @web.middleware
    async def _guard(self, request: web.Request, handler) -> web.StreamResponse:
        """Keeps other sites' pages out, token or not: a Host this server answers to (else DNS
        rebinding lets a page read the answers), no state change asked by another site's page, JSON
        bodies sent as JSON (a form or text/plain POST is one any page may send without asking), and a
        body no larger than its route needs."""
        host = _hostname(request.headers.get("Host", ""))
        if self._hosts is not None and host not in self._hosts:
            raise Problem(421, "misdirected_request", f"this server does not answer to the host {host!r}: use its "
                                                      "own address (or set [http] public_url)")
        if request.method in UNSAFE_METHODS:
            origin = request.headers.get("Origin")
            if origin is not None and not self._same_site(origin, request.headers.get("Host", "")):
                raise Problem(403, "cross_origin", f"a request from the page of {origin} may not change anything "
                                                   "here")
            # A form may be sent by any page without asking; only the upload routes take one, and there the
            # Origin check above and the bearer token (which no other page has) keep other sites out.
            allowed = {"application/json"} | ({"multipart/form-data"} if request.path in self._form_routes else set())
            untyped = origin is None and request.path in self._untyped_json_routes
            if request.body_exists and request.content_type not in allowed and not untyped:
                raise Problem(415, "unsupported_media_type", f"send the body as {' or '.join(sorted(allowed))} "
                                                             f"(Content-Type), not {request.content_type}")
        limit = IMAGE_BODY_BYTES if request.path in self._image_routes | self._form_routes else JSON_BODY_BYTES
        if request.content_length is not None and request.content_length > limit:
            raise Problem(413, "too_large", f"a body on {request.path} may be at most {limit >> 20} MiB")
        return await handler(request.clone(client_max_size=limit))

    def _same_site(self, origin: str, host: str) -> bool:
        """Whether a browser's Origin is this server's own page: as the browser reached it, or its public_url."""
        netloc = urlparse(origin).netloc.lower()
        public = urlparse(self.settings.public_url or "").netloc.lower()
        return bool(netloc) and netloc in (host.lower(), public)

    @web.middleware
    async def _auth(self, request: web.Request, handler) -> web.StreamResponse:
        """Names the caller. With tokens configured, the APIs and /metrics need one; the page, its
        files and /openapi.json do not (the page asks for the token itself)."""
        path = request.path
        guarded = path.startswith("/v1/") or path == "/metrics" or self._surface(path) is not None
        request["caller"] = self._caller(request, guarded)
        return await handler(request)

    def _caller(self, request: web.Request, guarded: bool) -> Caller:
        if not self._tokens:  # loopback only: the one local user, whose page the guard keeps others' from
            return Caller("anonymous", False, self.settings.rate_per_minute, self.settings.live_per_minute,
                          admin=True, live=True)
        anonymous = Caller("anonymous", False, self.settings.rate_per_minute, self.settings.live_per_minute)
        header = request.headers.get("Authorization", "")
        try:
            given = header[7:].strip().encode() if header[:7].lower() == "bearer " else None
        except UnicodeEncodeError:  # bytes that are not UTF-8: no token of ours
            raise Problem(401, "unauthorized", "that bearer token is not one of this server's") from None
        surface = self._surface(request.path)
        if given is None and header[:6].lower() == "basic " and surface is not None and surface.basic_auth:
            given = _basic_password(header[6:])
        if given is None:
            if guarded:
                raise Problem(401, "unauthorized", "this server needs a bearer token (Authorization: Bearer …)")
            return anonymous
        # Compare against every token, in constant time each: the timing says nothing of which was close.
        found = None
        for secret, token in self._tokens:
            if hmac.compare_digest(secret, given):
                found = token
        if found is None:
            raise Problem(401, "unauthorized", "that bearer token is not one of this server's")
        return Caller(found.user, True, found.rate_per_minute or self.settings.rate_per_minute,
                      self.settings.live_per_minute, admin=found.role == "admin",
                      live=found.live or found.role == "admin")

    # -- native API ----------------------------------------------------------- #

    async def create_job(self, request: web.Request) -> web.Response:
        body = parse(api.JobRequest, await read_json(request))
        if "id" in body.model_fields_set:  # else a known id would answer with, and watch, whoever's job it is
            raise Problem(422, "bad_request", "id: the server assigns job ids; to retry a submit safely, send "
                                              "an Idempotency-Key header", field="id")
        try:
            spec, inputs = body.split()
        except ValueError as exc:
            field = str(exc).partition(":")[0]
            raise Problem(422, "bad_request", str(exc), field=field) from None
        spec = self.owned(spec, request["caller"])
        key = request.headers.get("Idempotency-Key")
        if key is not None and not (0 < len(key) <= 200 and key.isascii() and key.isprintable() and " " not in key):
            raise Problem(422, "bad_request", "Idempotency-Key: 1 to 200 visible ASCII characters",
                          field="Idempotency-Key")
        record = await self.submit(spec, request["caller"], inputs, idempotency_key=key)
        return json_response(self.view(record), status=202)

    async def list_jobs(self, request: web.Request) -> web.Response:
        """The caller's jobs; an admin's ``?user=NAME``, someone else's, and ``?all=1``, the whole queue."""
        caller: Caller = request["caller"]
        limit = query_int(request, "limit", 100, 1, 1000)
        user = request.query.get("user", caller.user)
        everyone = query_flag(request, "all")
        if (everyone or user != caller.user) and not caller.admin:
            raise Problem(403, "forbidden", f"only an admin may list other users' jobs; your token acts for "
                                            f"{caller.user}", field="all" if everyone else "user")
        if not 0 < len(user) <= 128:
            raise Problem(422, "bad_request", "user: 1 to 128 characters", field="user")
        records = await (self._queue(limit) if everyone else self.client.jobs_of(user, limit=limit))
        return web.json_response({"jobs": [json.loads(self.view(r).model_dump_json()) for r in records]})

    async def _queue(self, limit: int) -> list[JobRecord]:
        """The jobs on the runners, then those queued in their order: the whole queue, as an admin sees it."""
        status = await self.client.status()
        ids = [job for r in status.runners for job in r.capabilities.active_jobs or ([r.job] if r.job else [])]
        ids = list(dict.fromkeys(ids + status.queued))[:limit]
        found = await asyncio.gather(*(self.client.job(job_id) for job_id in ids), return_exceptions=True)
        for outcome in found:  # a job that ended and was forgotten in between is left out; anything else is said
            if isinstance(outcome, BaseException) and not (isinstance(outcome, RemoteError)
                                                           and outcome.error.code is ErrorCode.unknown_job):
                raise outcome
        return [record for record in found if isinstance(record, JobRecord)]

    async def get_job(self, request: web.Request) -> web.Response:
        return json_response(self.view(await self._mine(request)))

    async def cancel_job(self, request: web.Request) -> web.Response:
        record = await self._mine(request)
        return json_response(self.view(await self.client.cancel(record.spec.id)))

    async def job_events(self, request: web.Request) -> web.StreamResponse:
        """Server-Sent Events: ``state``, ``progress``, ``preview`` (a data URL), then ``result``."""
        record = await self._mine(request)
        with self._hold(request["caller"]):
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                                   "X-Accel-Buffering": "no"})
            await response.prepare(request)
            try:
                await self._stream(response, record)
            except asyncio.TimeoutError:  # the reader stopped reading: its connection goes, nothing waits on it
                log.info("dropping the event stream of %s: its reader took nothing for %.0f s", record.spec.id,
                         WRITE_TIMEOUT_S)
                if request.transport is not None:
                    request.transport.close()
            except (ConnectionError, RemoteError) as exc:  # the headers are out: the stream can only end
                log.info("the event stream of %s ended early: %s", record.spec.id, exc)
            return response

    async def _stream(self, response: web.StreamResponse, record: JobRecord) -> None:
        job_id = record.spec.id
        await _sse(response, "state", _state_of(record))
        if not record.state.terminal:
            queue = self.streams.subscribe(job_id, own=job_id in self._submitted)
            try:
                while True:
                    try:
                        event = await asyncio.wait_for(queue.get(), KEEPALIVE_S)
                    except asyncio.TimeoutError:
                        await _write(response, b": keep-alive\n\n")
                        continue
                    if event is None or isinstance(event, JobResult):
                        break
                    await _sse(response, "state" if isinstance(event, JobEvent) else event.kind, _event_json(event))
            finally:
                self.streams.unsubscribe(job_id, queue)
            record = await self.client.job(job_id)
        await _sse(response, "result", json.loads(self.view(record).model_dump_json()))

    @contextmanager
    def _hold(self, caller: Caller) -> Iterator[None]:
        """Counts a request held open (an event stream, a synchronous call) against the caps."""
        held, total = self._held[caller.user], sum(self._held.values())
        if total >= self.settings.max_streams:
            raise Problem(503, "busy", f"this server holds {total} event streams and waiting calls, its most; "
                                       "try again soon", retry_after_s=5.0)
        if held >= self.settings.max_streams_per_user and not caller.admin:
            raise Problem(429, "too_many_streams", f"{caller.user} has {held} event streams and waiting calls "
                                                   f"open, the most a user may; close one first", retry_after_s=5.0)
        self._held[caller.user] += 1
        try:
            yield
        finally:
            self._held[caller.user] -= 1
            if not self._held[caller.user]:
                del self._held[caller.user]

    hold = _hold  # for the surfaces' long-lived connections (ComfyUI's /ws): the same caps

    async def models(self, request: web.Request) -> web.Response:
        listed = [api.ModelEntry(id=m.name, **m.model_dump(mode="json", exclude={"name"}))
                  for m in await self.client.models(user=request["caller"].user)]
        return json_response(api.ModelList(data=listed))

    async def model(self, request: web.Request) -> web.Response:
        """One model of the catalog (OpenAI's ``models.retrieve``)."""
        name = request.match_info["model_id"]
        found = next((m for m in await self.client.models(user=request["caller"].user) if m.name == name), None)
        if found is None:
            raise Problem(404, "unknown_model", f"no model {name!r}; GET /v1/models lists them", field="model")
        return json_response(api.ModelEntry(id=found.name, **found.model_dump(mode="json", exclude={"name"})))

    async def nodes(self, request: web.Request) -> web.Response:
        """The runners and loaders; to a user without the jobs on them, the processes' ids or hosts (which
        would name other users' jobs), only whether each is busy."""
        status = await self._cluster_status()
        admin = request["caller"].admin
        hidden = {"job": True, "capabilities": {"pid", "host", "active_batch", "active_jobs"}}
        runners = [r.model_dump(mode="json") if admin else
                   {**r.model_dump(mode="json", exclude=hidden), "busy": bool(r.job or r.capabilities.active_jobs)}
                   for r in status.runners]
        return web.json_response({
            "runners": runners, "loaders": [json.loads(s.model_dump_json()) for s in status.loaders],
            "queued": status.queued_total, "jobs": status.counts})

    async def artifact(self, request: web.Request) -> web.StreamResponse:
        return await self.output_file(request.match_info["name"], request["caller"])

    async def output_file(self, name: str, caller: Caller, *, owner: str | None = None) -> web.StreamResponse:
        """An output by its artifact name (``<job id>-<n>.<ext>``), to its job's user or an admin; ``owner``,
        where the caller knows it already, spares asking the scheduler."""
        match = ARTIFACT_NAME.fullmatch(name)
        if match is None:
            raise Problem(404, "not_found", f"no artifact {name!r}: a name is <job id>-<n>.<extension>")
        job_id, index = match["job"], int(match["index"])
        if self.signer is not None:
            return await self._signed_redirect(name, job_id, index, caller)
        if not caller.admin:
            if owner is None:
                try:
                    owner = (await self.client.job(job_id)).spec.user
                except RemoteError as exc:
                    if exc.error.code is not ErrorCode.unknown_job:
                        raise
                    raise Problem(404, "not_found", f"no artifact {name!r} (its job is gone)") from None
            if owner != caller.user:
                raise Problem(403, "forbidden", f"artifact {name} is not {caller.user}'s")
        path = self.config.artifact_dir / name
        if path.is_file():
            return web.FileResponse(path, headers={"Content-Type": media_type_for(name)})
        # Kept by another host's scheduler: this server still has what it received for its own jobs.
        result = self.client.result(job_id)
        if result is not None and index < len(result.outputs):
            output = result.outputs[index]
            return web.Response(body=bytes(output.data), content_type=output.media_type)
        raise Problem(404, "not_found", f"no artifact {name!r} (gone, or kept on another host)")

    async def _signed_redirect(self, name: str, job_id: str, index: int, caller: Caller) -> web.StreamResponse:
        """An S3-stored output: 302 to a pre-signed GET URL, after the same owner check."""
        try:
            record = await self.client.job(job_id)
        except RemoteError as exc:
            if exc.error.code is not ErrorCode.unknown_job:
                raise
            raise Problem(404, "not_found", f"no artifact {name!r} (its job is gone)") from None
        if not caller.admin and record.spec.user != caller.user:
            raise Problem(403, "forbidden", f"artifact {name} is not {caller.user}'s")
        url = self._signed(record, index)
        if url is None or record.reason is not None and "retention" in record.reason:
            raise Problem(404, "not_found", f"no artifact {name!r} (gone: {record.reason or 'not stored'})")
        raise web.HTTPFound(url, headers={"Cache-Control": "no-store"})

    def _signed(self, record: JobRecord, index: int) -> str | None:
        if self.signer is None or index >= len(record.artifacts):
            return None
        try:
            return self.signer.signed_url(record.artifacts[index])
        except StoreError:
            return None

    # -- the rest -------------------------------------------------------------- #

    async def page(self, request: web.Request) -> web.StreamResponse:
        index = WEB_ROOT / "index.html"
        if not index.is_file():
            raise web.HTTPNotFound(text="the web page is not installed")
        return web.FileResponse(index)

    async def openapi(self, request: web.Request) -> web.Response:
        from frontends.openapi import document

        return web.json_response(document(self.base_url))

    async def prometheus(self, request: web.Request) -> web.Response:
        status = await self._cluster_status()
        return web.Response(body=self.metrics.render(status), headers={"Content-Type": metrics.CONTENT_TYPE})

    def _cluster_status(self) -> Awaitable[ClusterStatus]:
        """The scheduler's status, asked at most once every STATUS_TTL_S and shared by every request meanwhile:
        a flood of /metrics or /v1/nodes costs the scheduler one question a second."""
        asked = self._status
        stale = time.monotonic() - self._status_at > STATUS_TTL_S
        if asked is None or (asked.done() and (stale or asked.cancelled() or asked.exception() is not None)):
            self._status_at = time.monotonic()
            asked = self._status = asyncio.ensure_future(self.client.status())
        return asyncio.shield(asked)

    # -- helpers --------------------------------------------------------------- #

    def owned(self, spec: JobSpec, caller: Caller) -> JobSpec:
        """The job as the caller may submit it: for the user their token names."""
        if caller.authenticated:
            if "user" in spec.model_fields_set and spec.user != caller.user:
                raise Problem(403, "forbidden", f"your token acts for {caller.user}, not {spec.user}", field="user")
            return spec.model_copy(update={"user": caller.user})
        return spec

    async def submit(self, spec: JobSpec, caller: Caller, inputs: JobInputs | None = None, *,
                      idempotency_key: str | None = None) -> JobRecord:
        if spec.priority is Priority.live and not caller.live:
            raise Problem(403, "forbidden", f"{caller.user} may not submit live jobs (they go before everyone "
                                            "else's): the operator grants that with live = true on the token",
                          field="priority")
        # A live session's prompts replace each other, so they queue nothing: they have a bucket of
        # their own, sized for typing, and do not use up the user's jobs. A session not yet open is
        # an ordinary job, so a fresh session per prompt buys nothing.
        live = spec.session is not None and self.sessions.is_open(spec.user, spec.session)
        rate = caller.live_per_minute if live else caller.rate_per_minute
        wait = self.limiter.take(f"{spec.user}/live" if live else spec.user, rate)
        if wait:
            what = "live prompts" if live else "jobs"
            raise Problem(429, "rate_limited", f"{spec.user} may submit {rate} {what} a minute; "
                                               f"try again in {wait:.0f} s", retry_after_s=wait)
        if spec.session is not None:
            self.sessions.use(spec.user, spec.session)
        try:
            # With a key, a client's retry (after a timeout, or after this server restarted) gets the job
            # the first try made: its id is then that job's.
            record = await self.client.submit(spec, inputs=inputs, idempotency_key=idempotency_key)
        except RemoteError as exc:
            raise from_remote(exc) from None
        self._submitted[record.spec.id] = None
        while len(self._submitted) > JobStreams.KEEP:
            self._submitted.popitem(last=False)
        self.streams.records.learned(record)  # before its events: the next poll is answered here
        self.streams.follow(record.spec.id, own=True)
        return record

    async def generate(self, spec: JobSpec, caller: Caller, inputs: JobInputs | None = None) -> JobResult:
        """Submits and waits for the images (the OpenAI and A1111 calls are synchronous)."""
        with self._hold(caller):
            await self.submit(spec, caller, inputs)
            try:
                result = await self.client.wait(spec.id, timeout=SYNC_TIMEOUT_S)
            except asyncio.TimeoutError:
                await self.client.cancel(spec.id)
                raise Problem(504, "timeout", f"no images after {SYNC_TIMEOUT_S:.0f} s; the job was cancelled") \
                    from None
        if result.job.state.value != "done":
            raise Problem(422 if result.job.state.value == "failed" else 409, result.job.state.value,
                          f"the job {result.job.state.value}: {result.job.reason}")
        return result

    async def _mine(self, request: web.Request) -> JobRecord:
        record = await self._record(job_id_of(request))
        caller: Caller = request["caller"]
        if not caller.admin and record.spec.user != caller.user:
            raise Problem(403, "forbidden", f"job {record.spec.id} is not {caller.user}'s")
        return record

    async def _record(self, job_id: str) -> JobRecord:
        """The job's record: from what this server heard of it where that is sure to be right
        (frontends/jobcache.py), else the scheduler's answer, kept for the next poll where the job's
        events come here (its own jobs, and those it follows) or it has ended."""
        cached = self.streams.records.get(job_id)
        if cached is not None:
            return cached
        asked_at = self.streams.records.clock()
        record = await self.client.job(job_id)
        followed = self.streams.latest(job_id)
        if record.state.terminal or (followed is not None and not followed.ended):
            self.streams.records.learned(record, asked_at)
        return record

    def view(self, record: JobRecord) -> api.JobView:
        # Built, not validated again: the record is the scheduler's, validated in full when the client decoded
        # it, and dumping it to validate it anew was a tenth of a poll's CPU.
        return api.JobView.model_construct(**{name: getattr(record, name) for name in JobRecord.model_fields},
                                           urls=[self.url(record, i) for i in range(len(record.artifacts))])

    def url(self, record: JobRecord, index: int) -> str:
        """Where output ``index`` can be fetched: the artifact route, or for an S3-stored output a pre-signed
        GET URL (it expires after [store] url_expiry_s: its X-Amz-Expires; the artifact route signs anew)."""
        if (signed := self._signed(record, index)) is not None:
            return signed
        name = Path(urlparse(record.artifacts[index]).path).name if index < len(record.artifacts) else \
            f"{record.spec.id}-{index}.png"
        return f"{self.base_url}/v1/artifacts/{name}"


# --------------------------------------------------------------------------- #


def _basic_password(credentials: str) -> bytes:
    """The password of HTTP Basic credentials (``base64(user:password)``), where a token is sent that way."""
    try:
        return base64.b64decode(credentials.strip(), validate=True).partition(b":")[2]
    except ValueError:  # not base64 (binascii.Error is one): no token of ours
        raise Problem(401, "unauthorized", "those Basic credentials do not decode (base64 of user:token)") from None


def _hostname(host: str) -> str:
    """The name in a Host header, without its port or an IPv6 address's brackets."""
    try:
        return (urlparse(f"//{host}").hostname or "").rstrip(".")
    except ValueError:
        return host


def _answered_hosts(host: str, public_url: str | None) -> set[str] | None:
    """The names a request's Host may carry. None where any may: a server on every address is reached by
    names it cannot know, and needs tokens there, which another site's page does not have."""
    if host in WILDCARD_HOSTS:
        return None
    names = set(LOOPBACK) | {_hostname(host)}
    if public_url:
        names.add(_hostname(urlparse(public_url).netloc))
    return names - {""}


def _state_of(record: JobRecord) -> dict[str, Any]:
    return json.loads(JobEvent(job_id=record.spec.id, state=record.state, reason=record.reason,
                               position=record.position, eta_s=record.eta_s, runner=record.runner,
                               attempt=record.attempts, batch_id=record.batch_id).model_dump_json())


def _event_json(event: JobEvent | Progress | Preview) -> dict[str, Any]:
    if isinstance(event, Preview):
        data = base64.b64encode(bytes(event.image)).decode("ascii")
        return {"job_id": event.job_id, "step": event.step, "width": event.width, "height": event.height,
                "image": f"data:{event.media_type};base64,{data}"}
    return json.loads(event.model_dump_json())


async def _sse(response: web.StreamResponse, name: str, data: dict[str, Any]) -> None:
    await _write(response, f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode())


async def _write(response: web.StreamResponse, data: bytes) -> None:
    """Writes, or raises TimeoutError where the reader has taken nothing for WRITE_TIMEOUT_S."""
    await asyncio.wait_for(response.write(data), WRITE_TIMEOUT_S)


# --------------------------------------------------------------------------- #


async def serve(config: Config, router: str, pub: str, host: str, port: int,
                ready: Callable[[str], Awaitable[None]] | None = None, stop: asyncio.Event | None = None) -> None:
    """Runs the HTTP server until ``stop`` is set."""
    if host not in LOOPBACK and not config.http.tokens:
        raise Failure(f"refusing to serve HTTP on {host}: beyond this machine, [http] tokens are required", 2)
    if config.http.tokens and _in_clear(host, config.http.public_url):
        log.warning("tokens travel in clear over plain HTTP beyond this machine: put a TLS proxy in front "
                    "(Caddy, nginx) and set [http] public_url to its https:// address")
    client = AtelierClient(router, pub, name=f"http-{uuid.uuid4().hex[:8]}", keys=for_peer(config))
    await client.start()
    server = HttpServer(config, client, base_url="", host=host)
    runner = web.AppRunner(server.app, access_log_class=AccessLog)
    following = asyncio.create_task(follow_catalog(client, config), name="follow-catalog")  # an operator's reload
    try:
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
        bound = runner.addresses[0][1]  # port 0 asks the OS for one: this is the one it gave
        shown = f"[{host}]" if ":" in host else host
        server.base_url = (config.http.public_url or f"http://{shown}:{bound}").rstrip("/")
        log.info("HTTP on %s", server.base_url)
        if ready is not None:
            await ready(server.base_url)
        await (stop or asyncio.Event()).wait()
    finally:
        following.cancel()
        await runner.cleanup()
        await client.close()


def _in_clear(host: str, public_url: str | None) -> bool:
    """Whether requests reach this server from beyond loopback over plain HTTP."""
    if public_url is not None:
        return urlparse(public_url).scheme == "http" and _hostname(urlparse(public_url).netloc) not in LOOPBACK
    return host not in LOOPBACK


async def _serve_process(args: argparse.Namespace, config: Config, stop: asyncio.Event) -> None:
    host, port = config.http.host, config.http.port
    if args.listen:
        host, _, port_text = args.listen.rpartition(":")
        port = int(port_text)

    async def ready(url: str) -> None:
        print(READY_PREFIX + json.dumps({"url": url}), flush=True)

    await serve(config, args.router or config.broker.router, args.pub or config.broker.pub, host, port, ready, stop)


def main(argv: list[str] | None = None) -> int:
    parser = process_parser("atelier http", "Serve atelier's HTTP API and web page.",
                            pub="the broker's XPUB endpoint (default from the config)")
    parser.add_argument("--listen", help="HOST:PORT (default from the config: 127.0.0.1:8080)")
    return process_main(parser, _serve_process, argv, log_name="http",
                        other_address="choose another with --listen (atelier up: --http), or [http] port in "
                                      "the config")


if __name__ == "__main__":
    raise SystemExit(main())
