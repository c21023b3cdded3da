"""What every API the HTTP server speaks shares: its errors, the caller a request acts for, reading a
JSON body, and the ``Surface`` each compatible API (OpenAI, AUTOMATIC1111, ComfyUI) is.

A surface is one client ecosystem's routes and error shape over the server's own ``Gateway``: the one
place jobs are submitted, so tokens, the rate limit, the held-request caps and the scheduler's fair
share apply to every route alike, whichever API it belongs to.
"""

from __future__ import annotations

import json
import logging
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web
from pydantic import BaseModel, TypeAdapter, ValidationError

from actors.actor import RemoteError
from actors.messages import JobResult
from atelier.config import Config
from atelier.jobs import ErrorCode, JobId, JobInputs, JobRecord, JobSpec
from frontends import api

if TYPE_CHECKING:
    from frontends.client import AtelierClient

MAX_JSON_DEPTH = 32  # deeper than any body of these APIs; json and pydantic would recurse on it
log = logging.getLogger("atelier.http")


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


def from_remote(exc: RemoteError) -> Problem:
    error = exc.error
    if error.code not in _STATUS:  # the scheduler's own failure: its text may hold paths and internals
        log.warning("the scheduler failed a request: %s: %s", error.code.value, error.message)
        return Problem(502, error.code.value, "the scheduler could not serve this request; the operator's log "
                                              "has the details", retry_after_s=error.retry_after_s)
    return Problem(_STATUS[error.code], error.code.value, error.message, field=error.field,
                   retry_after_s=error.retry_after_s)


@dataclass
class Caller:
    user: str
    authenticated: bool  # a token named the user (else the request did, or nobody)
    rate_per_minute: int
    live_per_minute: int
    admin: bool = False  # sees and cancels every job; with no tokens, the local user is one
    live: bool = False  # may submit priority "live"


class Gateway(Protocol):
    """What a surface may ask of the HTTP server (``frontends.http.HttpServer``)."""

    config: Config
    client: AtelierClient
    base_url: str
    streams: Any  # frontends.http.JobStreams: each job's latest state, progress and preview

    def owned(self, spec: JobSpec, caller: Caller) -> JobSpec:
        """The job as the caller may submit it: for the user their token names (403 for another)."""

    async def submit(self, spec: JobSpec, caller: Caller, inputs: JobInputs | None = None) -> JobRecord:
        """Queues the job, through the rate limit; it is followed, for streams and progress."""

    async def generate(self, spec: JobSpec, caller: Caller, inputs: JobInputs | None = None) -> JobResult:
        """Submits and waits for the outputs (what a synchronous call answers with), holding one of the
        caller's open-request slots meanwhile; a job that fails or is cancelled is a Problem."""

    def url(self, record: JobRecord, index: int) -> str:
        """Where output ``index`` of a job can be fetched (the native artifact route)."""

    def view(self, record: JobRecord) -> api.JobView:
        """The job as the native API shows it: its record and its outputs' URLs."""

    async def output_file(self, name: str, caller: Caller, *, owner: str | None = None) -> web.StreamResponse:
        """A job's output by its artifact name, to its user or an admin (the native artifact route's
        answer: 403 for another user's, 404 for one that is gone)."""

    def hold(self, caller: Caller) -> AbstractContextManager[None]:
        """Counts a long-lived request (a websocket) against the caller's and the server's caps, as
        event streams and waiting calls are; a Problem (429, 503) when they are reached."""


class Surface:
    """One compatible API: its routes, which paths are its own, and its errors' shape."""

    # Paths that are this API's: each one exactly, and anything below it ("/sdapi/" ends in a slash: all under it).
    paths: tuple[str, ...] = ()
    # POST routes whose body may be multipart/form-data (file uploads), and those that may carry images (64 MiB).
    form_routes: frozenset[str] = frozenset()
    image_routes: frozenset[str] = frozenset()
    # POST routes whose clients send JSON under another Content-Type, or none (SillyTavern's server posts
    # ComfyUI's /prompt as text/plain, which ComfyUI reads as JSON regardless): taken as JSON, but only from a
    # request with no Origin, which is never a browser page's (browsers send one with every cross-site POST).
    untyped_json_routes: frozenset[str] = frozenset()
    # Whether its clients may send the token as the password of HTTP Basic credentials (any user name): A1111's
    # clients (Open WebUI, SillyTavern) know only its --api-auth, which is Basic.
    basic_auth: bool = False

    def __init__(self, gateway: Gateway):
        self.gateway = gateway

    def routes(self) -> list[web.AbstractRouteDef]:
        raise NotImplementedError

    def owns(self, path: str) -> bool:
        return any(path == p or path.startswith(p if p.endswith("/") else p + "/") for p in self.paths)

    def render(self, problem: Problem) -> tuple[BaseModel | dict[str, Any], int]:
        """The error as this API's clients read one: its body and status."""
        raise NotImplementedError

    async def close(self) -> None:
        """At shutdown, before the server waits for its requests: end what this API holds open for ever."""


async def read_json(request: web.Request) -> Any:
    too_deep = Problem(400, "bad_request", f"the body nests deeper than {MAX_JSON_DEPTH} levels; no field of "
                                           "this API does")
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise Problem(400, "bad_request", "the body must be JSON") from None
    except RecursionError:
        raise too_deep from None
    if depth(body) > MAX_JSON_DEPTH:
        raise too_deep
    return body


def depth(value: Any) -> int:
    """How deep JSON nests, counted without recursion (which a crafted body would exhaust)."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        value, depth = todo.pop()
        if isinstance(value, (dict, list)):
            deepest = max(deepest, depth)
            if depth <= MAX_JSON_DEPTH:
                todo.extend((item, depth + 1) for item in (value.values() if isinstance(value, dict) else value))
    return deepest


def query_flag(request: web.Request, name: str) -> bool:
    value = request.query.get(name, "false").lower()
    if value not in ("1", "true", "0", "false"):
        raise Problem(422, "bad_request", f"{name} must be true or false", field=name)
    return value in ("1", "true")


def admin_only(request: web.Request, what: str) -> Caller:
    """The caller, if an admin; else a 403 that says what only an admin may do."""
    caller: Caller = request["caller"]
    if not caller.admin:
        raise Problem(403, "forbidden", f"only an admin may {what}; your token acts for {caller.user}, a user")
    return caller


_JOB_IDS = TypeAdapter(JobId)


def job_id_of(request: web.Request) -> str:
    """The route's ``{job_id}``; one no job can have is a 404 here (building a message of it would fail)."""
    job_id = request.match_info["job_id"]
    try:
        return _JOB_IDS.validate_python(job_id)
    except ValidationError:
        raise Problem(404, "unknown_job", f"no job {job_id[:64]!r}: a job id is 1 to 64 letters, digits, _ and -",
                      field="job_id") from None


def parse(model: type[BaseModel], data: Any) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise Problem.invalid(exc) from None


def query_int(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    try:
        value = int(request.query.get(name, default))
    except ValueError:
        raise Problem(422, "bad_request", f"{name} must be a whole number", field=name) from None
    if not low <= value <= high:
        raise Problem(422, "bad_request", f"{name} must be between {low} and {high}", field=name)
    return value


def json_response(model: BaseModel, *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(text=model.model_dump_json(), status=status, content_type="application/json",
                        headers=headers)


async def read_part(part: Any, name: str, limit: int) -> bytes:
    """A multipart part's bytes, refused (413) past ``limit`` as they arrive: a chunked body declares no
    length for the server's own cap to check."""
    data = bytearray()
    while chunk := await part.read_chunk(1 << 16):
        data.extend(chunk)
        if len(data) > limit:
            raise Problem(413, "too_large", f"{name}: more than {limit:,} bytes; send a smaller one", field=name)
    return bytes(data)
