"""An operator's controls over HTTP (admins only): pause, drain, reorder, reload the catalog.

    GET  /v1/admin/controls                  the controls: {"paused", "paused_models", "nodes"}
    POST /v1/admin/pause    {"model": M?}    the queue (or one model) starts nothing new -> the controls
    POST /v1/admin/resume   {"model": M?}    starts again (no model: the queue and every paused model)
    POST /v1/admin/nodes/{node}/drain        the node's runners finish their batch, take nothing new
    POST /v1/admin/nodes/{node}/resume       the node serves again
    POST /v1/jobs/{job_id}/front             a queued job starts next -> the job
    POST /v1/jobs/{job_id}/priority {"priority": "live"|"interactive"|"batch"} -> the job
    POST /v1/admin/catalog/reload            the scheduler reads its config file's models again
                                             -> {"added", "changed", "removed"}

Cancelling anyone's job stays ``DELETE /v1/jobs/{id}`` (an admin may). A user's token gets 403 on
every route here, whatever the body; the scheduler's refusals (a job no longer queued, a model or
node it does not know, a config file that does not validate) come back as the native API's errors.
"""

from __future__ import annotations

from typing import Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from actors.actor import RemoteError
from actors.codec import SCHEDULER
from actors.messages import (
    DrainNode,
    GetControls,
    MoveToFront,
    OperatorControls,
    PauseQueue,
    ReloadCatalog,
    ResumeNode,
    ResumeQueue,
    SetPriority,
)
from atelier.jobs import Name, Priority
from frontends import api
from frontends.httpbase import Problem, Surface, admin_only, from_remote, job_id_of, json_response, parse, read_json

NODE_NAME = TypeAdapter(DrainNode.model_fields["node"].annotation)


class ModelChoice(BaseModel):
    """``POST /v1/admin/pause`` and ``/resume``: one model, or (none, or no body) the whole queue."""

    model_config = ConfigDict(extra="forbid")

    model: Name | None = Field(default=None, description="one model of the catalog; default: the whole queue")


class PriorityChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    priority: Priority


class ControlsView(BaseModel):
    paused: bool = Field(description="the whole queue: nothing new starts")
    paused_models: list[str] = Field(description="models whose jobs start nothing new")
    nodes: dict[str, Literal["serving", "draining", "drained"]] = Field(
        description="every node: draining while its runners finish their batches, drained once they are idle")


class CatalogChangesView(BaseModel):
    added: list[str]
    changed: list[str]
    removed: list[str]


class OperatorSurface(Surface):
    paths = ("/v1/admin",)

    def routes(self) -> list[web.AbstractRouteDef]:
        return [web.get("/v1/admin/controls", self.controls), web.post("/v1/admin/pause", self.pause),
                web.post("/v1/admin/resume", self.resume),
                web.post("/v1/admin/nodes/{node}/drain", self.drain_node),
                web.post("/v1/admin/nodes/{node}/resume", self.resume_node),
                web.post("/v1/jobs/{job_id}/front", self.front), web.post("/v1/jobs/{job_id}/priority", self.priority),
                web.post("/v1/admin/catalog/reload", self.reload)]

    def render(self, problem: Problem) -> tuple[BaseModel, int]:
        return api.ApiError(error=api.ErrorBody(code=problem.code, message=problem.message, field=problem.field,
                                                problems=problem.problems, retry_after_s=problem.retry_after_s)), \
            problem.status

    async def controls(self, request: web.Request) -> web.Response:
        admin_only(request, "see the operator's controls")
        return _controls(await self._ask(GetControls()))

    async def pause(self, request: web.Request) -> web.Response:
        admin_only(request, "pause the queue")
        choice = await _optional(request, ModelChoice)
        return _controls(await self._ask(PauseQueue(model=choice.model)))

    async def resume(self, request: web.Request) -> web.Response:
        admin_only(request, "resume the queue")
        choice = await _optional(request, ModelChoice)
        return _controls(await self._ask(ResumeQueue(model=choice.model)))

    async def drain_node(self, request: web.Request) -> web.Response:
        admin_only(request, "drain a node")
        return _controls(await self._ask(DrainNode(node=_node(request))))

    async def resume_node(self, request: web.Request) -> web.Response:
        admin_only(request, "resume a node")
        return _controls(await self._ask(ResumeNode(node=_node(request))))

    async def front(self, request: web.Request) -> web.Response:
        admin_only(request, "move a job to the front")
        return self._job(await self._ask(MoveToFront(job_id=job_id_of(request))))

    async def priority(self, request: web.Request) -> web.Response:
        admin_only(request, "change a job's priority")
        job_id = job_id_of(request)
        choice = parse(PriorityChoice, await read_json(request))
        return self._job(await self._ask(SetPriority(job_id=job_id, priority=choice.priority)))

    async def reload(self, request: web.Request) -> web.Response:
        admin_only(request, "reload the catalog")
        changes = await self._ask(ReloadCatalog(), timeout=30.0)  # the file is read and checked: a moment
        return json_response(CatalogChangesView(added=changes.added, changed=changes.changed,
                                                removed=changes.removed))

    def _job(self, info) -> web.Response:
        return json_response(self.gateway.view(info.job))

    async def _ask(self, msg, timeout: float = 10.0):
        try:
            return await self.gateway.client.ask(SCHEDULER, msg, timeout=timeout)
        except RemoteError as exc:
            raise from_remote(exc) from None


async def _optional(request: web.Request, model: type[ModelChoice]) -> ModelChoice:
    """A body that may be left out (the whole queue)."""
    if not request.body_exists:
        return model()
    return parse(model, await read_json(request))


def _node(request: web.Request) -> str:
    node = request.match_info["node"]
    try:
        return NODE_NAME.validate_python(node)
    except ValidationError:
        raise Problem(404, "not_found", f"no node {node[:128]!r}: a node's name is 1 to 128 characters",
                      field="node") from None


def _controls(controls: OperatorControls) -> web.Response:
    return json_response(ControlsView(paused=controls.paused, paused_models=controls.paused_models,
                                      nodes=controls.nodes))
