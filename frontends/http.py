"""atelier's HTTP server: the native API, the OpenAI and AUTOMATIC1111 APIs, a live event stream,
Prometheus metrics and the web page, in one aiohttp process.

It is a frontend like the CLI: every request goes through one ``AtelierClient`` to the
scheduler, so the HTTP server holds no queue and no job state of its own beyond what it relays.

- Native (``/v1/jobs`` …): submit a ``JobSpec``, read, list, cancel; ``/v1/jobs/{id}/events``
  streams the job's state, progress and preview frames as Server-Sent Events.
- OpenAI (``POST /v1/images/generations``, ``GET /v1/models``) and AUTOMATIC1111
  (``/sdapi/v1/txt2img``, ``img2img``, ``sd-models``, ``progress``, ``interrupt``), answered in
  those APIs' own shapes, so existing clients work unchanged.
- Bearer tokens from the config name the user a request acts for (atelier's fair share is per
  user); a bind beyond loopback refuses to start without them. Jobs are rate limited per user.
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
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from pydantic import BaseModel, TypeAdapter, ValidationError

from actors.actor import RemoteError
from actors.keys import for_peer
from actors.messages import JobEvent, JobResult, Preview, Progress
from atelier.artifacts import media_type_for
from atelier.config import Config, HttpConfig
from atelier.jobs import ErrorCode, JobId, JobInputs, JobKind, JobRecord, JobSpec
from atelier.runtime import READY_PREFIX, Failure, TaskSet, process_main, process_parser
from frontends import api, metrics
from frontends.client import AtelierClient

log = logging.getLogger("atelier.http")

LOOPBACK = {"127.0.0.1", "::1", "localhost"}
WEB_ROOT = Path(__file__).resolve().parent / "web"
SYNC_TIMEOUT_S = 600.0  # the OpenAI and A1111 calls wait for their images this long at most
KEEPALIVE_S = 15.0  # an SSE comment this often, so proxies keep an idle stream open
ARTIFACT_NAME = re.compile(r"^[A-Za-z0-9_-]+-\d+\.[a-z0-9]+$")
OPENAI_MODEL_NAMES = re.compile(r"^(dall-e|gpt-image)")  # OpenAI's own models: they mean "the default"
JOB_IDS = TypeAdapter(JobId)


class Problem(Exception):
    """A request that cannot be served as asked; rendered in the shape of the API it came through."""

    def __init__(self, status: int, code: str, message: str, *, field: str | None = None,
                 problems: list[api.FieldProblem] | None = None, retry_after_s: float | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.problems = problems or []
        self.retry_after_s = retry_after_s

    @classmethod
    def invalid(cls, exc: ValidationError) -> "Problem":
        problems = [api.FieldProblem(field=".".join(str(p) for p in err["loc"]) or "body", message=err["msg"])
                    for err in exc.errors(include_url=False)]
        first = problems[0]
        return cls(422, "bad_request", f"{first.field}: {first.message}", field=first.field, problems=problems)


# Statuses for the scheduler's refusals: what the caller did wrong, or when to come back.
_STATUS = {ErrorCode.bad_request: 422, ErrorCode.unknown_model: 422, ErrorCode.too_large: 413,
           ErrorCode.unknown_job: 404, ErrorCode.queue_full: 429, ErrorCode.busy: 503,
           ErrorCode.conflict: 409, ErrorCode.forbidden: 403}


def _from_remote(exc: RemoteError) -> Problem:
    error = exc.error
    return Problem(_STATUS.get(error.code, 502), error.code.value, error.message, field=error.field,
                   retry_after_s=error.retry_after_s)


@dataclass
class Caller:
    user: str
    authenticated: bool  # a token named the user (else the request did, or nobody)
    rate_per_minute: int
    live_per_minute: int


class RateLimiter:
    """A token bucket per user: ``rate`` jobs a minute, in a burst of up to as many."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # user -> (tokens, when)

    def take(self, user: str, rate_per_minute: int) -> float:
        """Takes one job's worth; returns 0, or the seconds until one is there (nothing taken)."""
        now = self.clock()
        tokens, then = self._buckets.get(user, (float(rate_per_minute), now))
        tokens = min(float(rate_per_minute), tokens + (now - then) * rate_per_minute / 60.0)
        if tokens < 1.0:
            self._buckets[user] = (tokens, now)
            return (1.0 - tokens) * 60.0 / rate_per_minute
        self._buckets[user] = (tokens - 1.0, now)
        return 0.0


@dataclass
class _Followed:
    own: bool  # submitted here: its JobResult comes to us, after its last JobEvent
    listeners: set[asyncio.Queue] = field(default_factory=set)
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

    def __init__(self, client: AtelierClient):
        self.client = client
        self._jobs: OrderedDict[str, _Followed] = OrderedDict()
        self._tasks = TaskSet("http-follow")

    def follow(self, job_id: str, *, own: bool) -> _Followed:
        followed = self._jobs.get(job_id)
        if followed is None:
            followed = self._jobs[job_id] = _Followed(own)
            self._tasks.spawn(self._read(job_id, followed), f"follow-{job_id}")
            while len(self._jobs) > self.KEEP:
                oldest, gone = next(iter(self._jobs.items()))
                if not gone.ended:
                    break
                del self._jobs[oldest]
        return followed

    def latest(self, job_id: str) -> _Followed | None:
        return self._jobs.get(job_id)

    def subscribe(self, job_id: str, *, own: bool) -> asyncio.Queue:
        """A queue of the job's events from now on, after its latest progress and preview; None ends it."""
        followed = self.follow(job_id, own=own)
        queue: asyncio.Queue = asyncio.Queue()
        for event in (followed.progress, followed.preview):
            if event is not None:
                queue.put_nowait(event)
        if followed.ended:
            queue.put_nowait(None)
        followed.listeners.add(queue)
        return queue

    def unsubscribe(self, job_id: str, queue: asyncio.Queue) -> None:
        followed = self._jobs.get(job_id)
        if followed is not None:
            followed.listeners.discard(queue)

    async def _read(self, job_id: str, followed: _Followed) -> None:
        try:
            async for event in self.client.events(job_id):
                if isinstance(event, JobEvent):
                    followed.state = event
                elif isinstance(event, Progress):
                    followed.progress = event
                elif isinstance(event, Preview):
                    followed.preview = event
                for queue in followed.listeners:
                    queue.put_nowait(event)
                # Another frontend's job: its result goes there; its last state is its end here.
                if isinstance(event, JobEvent) and event.state.terminal and not followed.own:
                    self.client.forget(job_id)
                    break
        except Exception:  # a lost stream ends its listeners; it must not end the server
            log.exception("following %s failed", job_id)
        finally:
            followed.ended = True
            for queue in followed.listeners:
                queue.put_nowait(None)

    async def close(self) -> None:
        await self._tasks.cancel_all()


class AccessLog(AbstractAccessLogger):
    """Method, path without its query, status and time: a token put in a URL never reaches the log."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info("%s %s %s %d %.1fms", request.remote, request.method, request.path, response.status,
                         time * 1000)


class HttpServer:
    def __init__(self, config: Config, client: AtelierClient, *, base_url: str):
        self.config = config
        self.settings: HttpConfig = config.http
        self.client = client
        self.base_url = base_url.rstrip("/")
        self.streams = JobStreams(client)
        self.limiter = RateLimiter()
        self.metrics = metrics.HttpMetrics()
        self._submitted: OrderedDict[str, None] = OrderedDict()  # job ids submitted here, newest last
        self._a1111_current: dict[str, str] = {}  # user -> their latest /sdapi job, for /progress
        self._tokens = [(t.token.get_secret_value().encode(), t) for t in self.settings.tokens]
        self.app = self._build()

    def _build(self) -> web.Application:
        app = web.Application(middlewares=[self._errors, self._auth], client_max_size=64 << 20)
        get, post, delete = web.get, web.post, web.delete
        app.add_routes([
            get("/", self.page), get("/openapi.json", self.openapi), get("/metrics", self.prometheus),
            post("/v1/jobs", self.create_job), get("/v1/jobs", self.list_jobs),
            get("/v1/jobs/{job_id}", self.get_job), delete("/v1/jobs/{job_id}", self.cancel_job),
            get("/v1/jobs/{job_id}/events", self.job_events), get("/v1/models", self.models),
            get("/v1/nodes", self.nodes), get("/v1/artifacts/{name}", self.artifact),
            post("/v1/images/generations", self.openai_generate),
            post("/sdapi/v1/txt2img", self.a1111_txt2img), post("/sdapi/v1/img2img", self.a1111_img2img),
            get("/sdapi/v1/sd-models", self.a1111_models), get("/sdapi/v1/progress", self.a1111_progress),
            post("/sdapi/v1/interrupt", self.a1111_interrupt),
        ])
        if WEB_ROOT.is_dir():
            app.router.add_static("/static/", WEB_ROOT, show_index=False)
        app.on_cleanup.append(lambda _: self.streams.close())
        return app

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
            response = self._render(request, _from_remote(exc))
        resource = request.match_info.route.resource
        self.metrics.observe(request.method, resource.canonical if resource else "unmatched", response.status,
                             time.monotonic() - started)
        return response

    def _render(self, request: web.Request, problem: Problem) -> web.Response:
        """The error in the shape of the API the request used."""
        path = request.path
        if path.startswith("/v1/images/"):
            body: BaseModel = api.OpenAIError(error=api.OpenAIErrorBody(
                message=problem.message, param=problem.field,
                type="rate_limit_error" if problem.status == 429 else "invalid_request_error",
                code="model_not_found" if problem.code == "unknown_model" else problem.code))
            status = 404 if problem.code == "unknown_model" else 400 if problem.status == 422 else problem.status
        elif path.startswith("/sdapi/"):
            body, status = api.A1111Error(detail=problem.message), problem.status
        else:
            body = api.ApiError(error=api.ErrorBody(code=problem.code, message=problem.message, field=problem.field,
                                                    problems=problem.problems, retry_after_s=problem.retry_after_s))
            status = problem.status
        headers = {}
        if problem.retry_after_s is not None:
            headers["Retry-After"] = str(max(1, round(problem.retry_after_s)))
        if status == 401:
            headers["WWW-Authenticate"] = 'Bearer realm="atelier"'
        return _json(body, status=status, headers=headers)

    @web.middleware
    async def _auth(self, request: web.Request, handler) -> web.StreamResponse:
        """Names the caller. With tokens configured, the APIs need one; the page, its files,
        /openapi.json and /metrics do not (the page asks for the token itself)."""
        guarded = request.path.startswith(("/v1/", "/sdapi/"))
        request["caller"] = self._caller(request, guarded)
        return await handler(request)

    def _caller(self, request: web.Request, guarded: bool) -> Caller:
        header = request.headers.get("Authorization", "")
        given = header[7:].strip().encode() if header[:7].lower() == "bearer " else None
        anonymous = Caller("anonymous", False, self.settings.rate_per_minute, self.settings.live_per_minute)
        if not self._tokens:
            return anonymous
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
                      self.settings.live_per_minute)

    # -- native API ----------------------------------------------------------- #

    async def create_job(self, request: web.Request) -> web.Response:
        body = _parse(api.JobRequest, await _body(request))
        try:
            spec, inputs = body.split()
        except ValueError as exc:
            field = str(exc).partition(":")[0]
            raise Problem(422, "bad_request", str(exc), field=field) from None
        spec = self._owned(spec, request["caller"])
        key = request.headers.get("Idempotency-Key")
        if key is not None and not (0 < len(key) <= 200 and key.isascii() and key.isprintable() and " " not in key):
            raise Problem(422, "bad_request", "Idempotency-Key: 1 to 200 visible ASCII characters",
                          field="Idempotency-Key")
        record = await self._submit(spec, request["caller"], inputs, idempotency_key=key)
        return _json(self._view(record), status=202)

    async def list_jobs(self, request: web.Request) -> web.Response:
        records = await self.client.jobs_of(request["caller"].user, limit=_int(request, "limit", 100, 1, 1000))
        return web.json_response({"jobs": [json.loads(self._view(r).model_dump_json()) for r in records]})

    async def get_job(self, request: web.Request) -> web.Response:
        return _json(self._view(await self._mine(request)))

    async def cancel_job(self, request: web.Request) -> web.Response:
        record = await self._mine(request)
        return _json(self._view(await self.client.cancel(record.spec.id)))

    async def job_events(self, request: web.Request) -> web.StreamResponse:
        """Server-Sent Events: ``state``, ``progress``, ``preview`` (a data URL), then ``result``."""
        record = await self._mine(request)
        job_id = record.spec.id
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                               "X-Accel-Buffering": "no"})
        await response.prepare(request)
        await _sse(response, "state", _state_of(record))
        if not record.state.terminal:
            queue = self.streams.subscribe(job_id, own=job_id in self._submitted)
            try:
                while True:
                    try:
                        event = await asyncio.wait_for(queue.get(), KEEPALIVE_S)
                    except asyncio.TimeoutError:
                        await response.write(b": keep-alive\n\n")
                        continue
                    if event is None or isinstance(event, JobResult):
                        break
                    await _sse(response, "state" if isinstance(event, JobEvent) else event.kind, _event_json(event))
            finally:
                self.streams.unsubscribe(job_id, queue)
            record = await self.client.job(job_id)
        await _sse(response, "result", json.loads(self._view(record).model_dump_json()))
        return response

    async def models(self, request: web.Request) -> web.Response:
        listed = [api.ModelEntry(id=m.name, **m.model_dump(mode="json", exclude={"name"}))
                  for m in await self.client.models()]
        return _json(api.ModelList(data=listed))

    async def nodes(self, request: web.Request) -> web.Response:
        status = await self.client.status()
        return web.json_response({
            "runners": [json.loads(r.model_dump_json()) for r in status.runners],
            "loaders": [json.loads(s.model_dump_json()) for s in status.loaders],
            "queued": len(status.queued), "jobs": status.counts})

    async def artifact(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if not ARTIFACT_NAME.fullmatch(name):
            raise Problem(404, "not_found", f"no artifact {name!r}")
        path = self.config.artifact_dir / name
        if path.is_file():
            return web.FileResponse(path, headers={"Content-Type": media_type_for(name)})
        # Kept by another host's scheduler: this server still has what it received for its own jobs.
        job_id, index = name.rsplit(".", 1)[0].rsplit("-", 1)
        result = self.client.result(job_id)
        if result is not None and int(index) < len(result.outputs):
            output = result.outputs[int(index)]
            return web.Response(body=bytes(output.data), content_type=output.media_type)
        raise Problem(404, "not_found", f"no artifact {name!r} (gone, or kept on another host)")

    # -- OpenAI -------------------------------------------------------------- #

    async def openai_generate(self, request: web.Request) -> web.Response:
        caller = request["caller"]
        body = _parse(api.OpenAIImageRequest, await _body(request))
        try:
            width, height = body.dimensions()
        except ValueError as exc:
            raise Problem(422, "bad_request", str(exc), field="size") from None
        model = body.model
        if model is None or OPENAI_MODEL_NAMES.match(model):
            model = self.config.default_model
        fields: dict[str, Any] = {"model": model, "prompt": body.prompt, "count": body.n, "width": width,
                                  "height": height}
        if body.user and not caller.authenticated:  # OpenAI's end-user tag; a token's user comes first
            fields["user"] = body.user
        spec = self._owned(_parse(JobSpec, fields), caller)
        result = await self._generate(spec, caller)
        data = []
        for i, output in enumerate(result.outputs):
            if body.response_format == "b64_json":
                data.append(api.OpenAIImage(b64_json=base64.b64encode(output.data).decode("ascii")))
            else:
                data.append(api.OpenAIImage(url=self._url(result.job, i)))
        return _json(api.OpenAIImagesResponse(created=int(result.job.finished_at or time.time()), data=data))

    # -- AUTOMATIC1111 ----------------------------------------------------------- #

    async def a1111_txt2img(self, request: web.Request) -> web.Response:
        body = _parse(api.A1111Txt2Img, await _body(request))
        return await self._a1111(request, body, JobKind.txt2img)

    async def a1111_img2img(self, request: web.Request) -> web.Response:
        body = _parse(api.A1111Img2Img, await _body(request))
        if not body.init_images:
            raise Problem(422, "bad_request", "init_images: img2img needs an init image", field="init_images")
        found = {}
        for name, value in (("image", body.init_images[0]), ("mask", body.mask)):
            if value:
                try:
                    found[name] = api.decode_image(value)
                except ValueError as exc:
                    field = "init_images" if name == "image" else name
                    raise Problem(422, "bad_request", f"{field}: {exc}", field=field) from None
        return await self._a1111(request, body, JobKind.img2img, JobInputs(**found), body.denoising_strength)

    async def _a1111(self, request: web.Request, body: api.A1111Txt2Img, kind: JobKind,
                     inputs: JobInputs | None = None, strength: float | None = None) -> web.Response:
        caller = request["caller"]
        for name, asked in (("enable_hr", body.enable_hr), ("restore_faces", body.restore_faces),
                            ("tiling", body.tiling), ("alwayson_scripts", body.alwayson_scripts)):
            if asked:
                raise Problem(422, "bad_request", f"{name}: atelier has no such feature; leave it off", field=name)
        model = self._a1111_model(body.override_settings.get("sd_model_checkpoint"))
        spec = self._owned(_parse(JobSpec, {
            "kind": kind, "model": model, "prompt": body.prompt, "negative_prompt": body.negative_prompt or None,
            "width": body.width, "height": body.height, "steps": body.steps, "guidance": body.cfg_scale,
            "seed": None if body.seed < 0 else body.seed, "count": body.batch_size * body.n_iter,
            "strength": strength}), caller)
        self._a1111_current[spec.user] = spec.id
        result = await self._generate(spec, caller, inputs)
        job = result.job.spec
        info = {"prompt": job.prompt, "all_prompts": [job.prompt] * job.count, "negative_prompt": body.negative_prompt,
                "seed": job.seed, "all_seeds": [o.seed for o in result.outputs], "width": job.width,
                "height": job.height, "steps": job.steps, "cfg_scale": job.guidance, "sd_model_name": job.model,
                "batch_size": body.batch_size, "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
                "infotexts": [f"{job.prompt}\nSteps: {job.steps}, CFG scale: {job.guidance}, Seed: {o.seed}, "
                              f"Size: {job.width}x{job.height}, Model: {job.model}" for o in result.outputs]}
        images = [base64.b64encode(o.data).decode("ascii") for o in result.outputs] if body.send_images else []
        return _json(api.A1111Images(images=images, parameters=body.model_dump(), info=json.dumps(info)))

    def _a1111_model(self, checkpoint: Any) -> str:
        if checkpoint in (None, ""):
            return self.config.default_model
        # A1111 names a checkpoint by its title, "name.safetensors [hash]": the catalog by its name.
        name = re.sub(r"\s*\[[0-9a-f]+\]$", "", str(checkpoint))
        for candidate in (name, Path(name).stem):
            if candidate in self.config.models:
                return candidate
        raise Problem(404, "unknown_model", f"no model {checkpoint!r}; see /sdapi/v1/sd-models",
                      field="sd_model_checkpoint")

    async def a1111_models(self, request: web.Request) -> web.Response:
        listed = [api.A1111Model(title=m.name, model_name=m.name, filename=self.config.models[m.name].source)
                  for m in await self.client.models() if m.name in self.config.models]
        return web.json_response([m.model_dump() for m in listed])

    async def a1111_progress(self, request: web.Request) -> web.Response:
        skip_image = request.query.get("skip_current_image", "false").lower()
        if skip_image not in ("true", "false"):  # what the document promises: a boolean, not anything at all
            raise Problem(422, "bad_request", "skip_current_image must be true or false", field="skip_current_image")
        job_id = self._a1111_current.get(request["caller"].user)
        followed = self.streams.latest(job_id) if job_id else None
        if followed is None or followed.ended:
            return _json(api.A1111Progress(progress=0.0, eta_relative=0.0, state=api.A1111ProgressState()))
        progress, preview = followed.progress, followed.preview
        done = progress.step / progress.total if progress else 0.0
        image = None
        if preview is not None and skip_image != "true":
            image = base64.b64encode(bytes(preview.image)).decode("ascii")
        state = api.A1111ProgressState(job=job_id, job_count=1, sampling_step=progress.step if progress else 0,
                                       sampling_steps=progress.total if progress else 0)
        phase = followed.state.state.value if followed.state else "queued"
        return _json(api.A1111Progress(progress=done, eta_relative=(progress.eta_s or 0.0) if progress else 0.0,
                                       state=state, current_image=image, textinfo=phase))

    async def a1111_interrupt(self, request: web.Request) -> web.Response:
        job_id = self._a1111_current.get(request["caller"].user)
        if job_id is not None:
            try:
                await self.client.cancel(job_id)
            except RemoteError as exc:
                # The latest job was refused, or is long forgotten: nothing runs, and as in A1111
                # interrupting nothing is fine (it used to be an undocumented 404).
                if exc.error.code is not ErrorCode.unknown_job:
                    raise
        return web.json_response({})

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
        status = await self.client.status()
        return web.Response(body=self.metrics.render(status), headers={"Content-Type": metrics.CONTENT_TYPE})

    # -- helpers --------------------------------------------------------------- #

    def _owned(self, spec: JobSpec, caller: Caller) -> JobSpec:
        """The job as the caller may submit it: for the user their token names."""
        if caller.authenticated:
            if "user" in spec.model_fields_set and spec.user != caller.user:
                raise Problem(403, "forbidden", f"your token acts for {caller.user}, not {spec.user}", field="user")
            return spec.model_copy(update={"user": caller.user})
        return spec

    async def _submit(self, spec: JobSpec, caller: Caller, inputs: JobInputs | None = None, *,
                      idempotency_key: str | None = None) -> JobRecord:
        # A live session's prompts replace each other, so they queue nothing: they have a bucket of
        # their own, sized for typing, and do not use up the user's jobs.
        live = spec.session is not None
        rate = caller.live_per_minute if live else caller.rate_per_minute
        wait = self.limiter.take(f"{spec.user}/live" if live else spec.user, rate)
        if wait:
            what = "live prompts" if live else "jobs"
            raise Problem(429, "rate_limited", f"{spec.user} may submit {rate} {what} a minute; "
                                               f"try again in {wait:.0f} s", retry_after_s=wait)
        try:
            # With a key, a client's retry (after a timeout, or after this server restarted) gets the job
            # the first try made: its id is then that job's.
            record = await self.client.submit(spec, inputs=inputs, idempotency_key=idempotency_key)
        except RemoteError as exc:
            raise _from_remote(exc) from None
        self._submitted[record.spec.id] = None
        while len(self._submitted) > JobStreams.KEEP:
            self._submitted.popitem(last=False)
        self.streams.follow(record.spec.id, own=True)
        return record

    async def _generate(self, spec: JobSpec, caller: Caller, inputs: JobInputs | None = None) -> JobResult:
        """Submits and waits for the images (the OpenAI and A1111 calls are synchronous)."""
        await self._submit(spec, caller, inputs)
        try:
            result = await self.client.wait(spec.id, timeout=SYNC_TIMEOUT_S)
        except asyncio.TimeoutError:
            await self.client.cancel(spec.id)
            raise Problem(504, "timeout", f"no images after {SYNC_TIMEOUT_S:.0f} s; the job was cancelled") from None
        if result.job.state.value != "done":
            raise Problem(422 if result.job.state.value == "failed" else 409, result.job.state.value,
                          f"the job {result.job.state.value}: {result.job.reason}")
        return result

    async def _mine(self, request: web.Request) -> JobRecord:
        job_id = request.match_info["job_id"]
        try:
            JOB_IDS.validate_python(job_id)
        except ValidationError:  # else building the GetJob message fails, and that was a 500
            raise Problem(404, "unknown_job", f"no job {job_id!r}: a job id is 1 to 64 letters, digits, _ and -",
                          field="job_id") from None
        record = await self.client.job(job_id)
        caller: Caller = request["caller"]
        if caller.authenticated and record.spec.user != caller.user:
            raise Problem(403, "forbidden", f"job {record.spec.id} is not {caller.user}'s")
        return record

    def _view(self, record: JobRecord) -> api.JobView:
        return api.JobView(**record.model_dump(), urls=[self._url(record, i) for i in range(len(record.artifacts))])

    def _url(self, record: JobRecord, index: int) -> str:
        name = Path(urlparse(record.artifacts[index]).path).name if index < len(record.artifacts) else \
            f"{record.spec.id}-{index}.png"
        return f"{self.base_url}/v1/artifacts/{name}"


# --------------------------------------------------------------------------- #


async def _body(request: web.Request) -> Any:
    try:
        return await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise Problem(400, "bad_request", "the body must be JSON") from None


def _parse(model: type[BaseModel], data: Any) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise Problem.invalid(exc) from None


def _int(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    try:
        value = int(request.query.get(name, default))
    except ValueError:
        raise Problem(422, "bad_request", f"{name} must be a whole number", field=name) from None
    if not low <= value <= high:
        raise Problem(422, "bad_request", f"{name} must be between {low} and {high}", field=name)
    return value


def _json(model: BaseModel, *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(text=model.model_dump_json(), status=status, content_type="application/json",
                        headers=headers)


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
    await response.write(f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode())


# --------------------------------------------------------------------------- #


async def serve(config: Config, router: str, pub: str, host: str, port: int,
                ready: Callable[[str], Awaitable[None]] | None = None, stop: asyncio.Event | None = None) -> None:
    """Runs the HTTP server until ``stop`` is set."""
    if host not in LOOPBACK and not config.http.tokens:
        raise Failure(f"refusing to serve HTTP on {host}: beyond this machine, [http] tokens are required", 2)
    client = AtelierClient(router, pub, name=f"http-{uuid.uuid4().hex[:8]}", keys=for_peer(config))
    await client.start()
    server = HttpServer(config, client, base_url="")
    runner = web.AppRunner(server.app, access_log_class=AccessLog)
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
        await runner.cleanup()
        await client.close()


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
