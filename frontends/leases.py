"""VRAM leases over HTTP, for admins: ``/v1/leases``.

``POST /v1/leases`` (``{"device": "cuda:0", "node": null, "bytes": "8GiB", "for_s": 600, "urgent": false,
"holder": "maw"}``) answers 201 with the lease once it is granted (the memory is free), or the refusal;
``DELETE /v1/leases/{id}`` gives it back (200, the lease with state "ended"); ``GET /v1/leases`` lists them.
A lease taken here is held by this HTTP server: it ends at its DELETE, at ``for_s``, or if the server goes
away. A user's token gets 403: lending the GPU stops everyone's work on it.
"""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, field_validator

from actors.actor import RemoteError
from actors.messages import MAX_LEASE_S, MAX_LEASE_WAIT_S
from atelier.jobs import ErrorCode, Lease
from atelier.vram import parse_size
from frontends import api
from frontends.httpbase import Problem, Surface, admin_only, from_remote, json_response, parse, read_json

LEASE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


class LeaseRequest(BaseModel):
    """``POST /v1/leases``: device memory for another program, for a while."""

    model_config = ConfigDict(extra="forbid")

    device: str | None = Field(default=None, min_length=1, max_length=64,
                               description="a runner's device (cuda:0, cpu); null: every device of the node")
    node: str | None = Field(default=None, min_length=1, max_length=128,
                             description="needed only where the device is on several nodes")
    bytes: int | str = Field(description="bytes, or with a unit: 8GiB, 512MiB, 10GB")
    for_s: float = Field(default=600.0, gt=0, le=MAX_LEASE_S, description="the lease ends after this at the latest")
    urgent: bool = Field(default=False, description="stop the running batch at its next step (queued again, "
                                                    "nothing lost) rather than let it finish")
    holder: str | None = Field(default=None, max_length=128, description="who holds it (default: the caller)")
    wait_s: float = Field(default=120.0, gt=0, le=MAX_LEASE_WAIT_S, description="how long to wait for the memory")

    @field_validator("bytes")
    @classmethod
    def _size(cls, value: int | str) -> int:
        return parse_size(value)


class LeaseListing(BaseModel):
    leases: list[Lease]


class LeaseSurface(Surface):
    paths = ("/v1/leases",)

    def routes(self) -> list[web.AbstractRouteDef]:
        return [web.get("/v1/leases", self.listing), web.post("/v1/leases", self.create),
                web.delete("/v1/leases/{lease_id}", self.delete)]

    def render(self, problem: Problem) -> tuple[BaseModel, int]:
        return api.ApiError(error=api.ErrorBody(code=problem.code, message=problem.message, field=problem.field,
                                                problems=problem.problems, retry_after_s=problem.retry_after_s)), \
            problem.status

    async def listing(self, request: web.Request) -> web.Response:
        admin_only(request, "lend GPU memory")
        return json_response(LeaseListing(leases=await self._ask("leases")))

    async def create(self, request: web.Request) -> web.Response:
        caller = admin_only(request, "lend GPU memory")
        body = parse(LeaseRequest, await read_json(request))
        lease = await self._ask("take_lease", body.device, body.bytes, body.for_s, node=body.node, urgent=body.urgent,
                                holder=body.holder or caller.user, wait_s=body.wait_s)
        return json_response(lease, status=201)

    async def delete(self, request: web.Request) -> web.Response:
        admin_only(request, "lend GPU memory")
        lease_id = request.match_info["lease_id"]
        if not LEASE_ID.fullmatch(lease_id):
            raise Problem(404, "not_found", f"no lease {lease_id[:64]!r}; GET /v1/leases lists them", field="id")
        return json_response(await self._ask("end_lease", lease_id))

    async def _ask(self, method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return await getattr(self.gateway.client, method)(*args, **kwargs)
        except RemoteError as exc:
            if exc.error.code is ErrorCode.bad_request and exc.error.field == "id":
                raise Problem(404, "not_found", exc.error.message, field="id") from None
            raise from_remote(exc) from None
        except TimeoutError:
            raise Problem(503, "busy", "the scheduler did not answer in time") from None
