"""ComfyUI's API (``/prompt``, ``/ws``, ``/history``, ``/view``, ``/queue``, ``/object_info``…), as the
front ends that speak only ComfyUI call it: Open WebUI, SillyTavern, Krita's plugin, n8n, scripts
written after ComfyUI's websockets_api_example.py.

A workflow becomes one atelier job (frontends/comfy_workflow.py), submitted through the gateway, so
tokens, the rate limit and the fair share apply as on the native API. ``/prompt`` answers at once;
the job's state, steps and previews come on the client's ``/ws`` as ComfyUI's messages, and its
images through ``/history`` and ``/view``. Every user sees only their own prompts and files.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import struct
import sys
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web
from PIL import Image, ImageFilter, UnidentifiedImageError

from actors.actor import RemoteError
from actors.messages import JobEvent, JobResult, Preview, Progress
from atelier.artifacts import media_type_for
from atelier.jobs import ErrorCode, JobInputs, JobKind, JobSpec, JobState
from frontends.comfy_workflow import NODES, SAMPLERS, SCHEDULERS, Catalog, Plan, WorkflowError, translate
from frontends.httpbase import Caller, Gateway, Problem, Surface, parse, read_json

log = logging.getLogger("atelier.http")

KEEP_PROMPTS = 1000  # prompts remembered (history, queue), the oldest ended ones go first
KEEP_PROMPT_BYTES = 64 << 20  # and the workflows they hold, by their JSON's size
UPLOADS_PER_USER = 32
UPLOAD_BYTES_PER_USER = 64 << 20
UPLOAD_BYTES = 512 << 20  # every user's together; the least recently used user's go first
MAX_UPLOAD_SIDE = 4096  # pixels: what an image-to-image job takes at most, and what a mask costs to make here
OUTBOX = 256  # messages waiting for a slow websocket reader; past it previews are dropped, then it is closed
WRITE_TIMEOUT_S = 30.0
STATS_TTL_S = 1.0
PREVIEW_IMAGE = 1  # ComfyUI's BinaryEventTypes.PREVIEW_IMAGE; then 1 = JPEG, 2 = PNG


class ComfyProblem(Problem):
    """A refused workflow, in ComfyUI's /prompt error shape."""

    def __init__(self, error: WorkflowError, status: int = 400):
        super().__init__(status, "invalid_prompt", str(error))
        self.error = error


@dataclass
class _Prompt:
    prompt_id: str
    number: int
    user: str
    client_id: str | None
    workflow: dict[str, Any]
    extra: dict[str, Any]
    plan: Plan
    size: int
    state: str = "pending"  # pending, running, success, error
    messages: list[list[Any]] = field(default_factory=list)  # ComfyUI's status.messages
    outputs: dict[str, Any] = field(default_factory=dict)

    def item(self) -> list[Any]:
        """The prompt as ComfyUI's queue and history list it: (number, id, prompt, extra_data, outputs)."""
        return [self.number, self.prompt_id, self.workflow, self.extra, list(self.plan.outputs)]


class _Outbox:
    """One websocket's messages not yet written: a reader that falls behind loses previews first."""

    def __init__(self):
        self.items: deque[tuple[str | bytes, bool]] = deque()
        self.ready = asyncio.Event()
        self.overflowed = False

    def put(self, message: str | bytes, droppable: bool = False) -> None:
        self.items.append((message, droppable))
        if len(self.items) > OUTBOX:
            kept = [m for m in self.items if not m[1]]
            if len(kept) > OUTBOX:
                self.overflowed = True
            self.items = deque(kept)
        self.ready.set()


class _Uploads:
    """Each user's uploaded images, in memory: bounded per user in count and bytes, and over all users."""

    def __init__(self):
        self.users: OrderedDict[str, OrderedDict[str, bytes]] = OrderedDict()
        self.info: dict[tuple[str, str], tuple[int, int, bool]] = {}
        self.total = 0

    def of(self, user: str) -> OrderedDict[str, bytes]:
        return self.users.get(user, OrderedDict())

    def add(self, user: str, name: str, data: bytes, info: tuple[int, int, bool]) -> None:
        files = self.users.pop(user, OrderedDict())
        self.users[user] = files
        self._drop(user, name)
        files[name] = data
        self.info[(user, name)] = info
        self.total += len(data)
        while len(files) > UPLOADS_PER_USER or sum(map(len, files.values())) > UPLOAD_BYTES_PER_USER:
            self._drop(user, next(iter(files)))
        while self.total > UPLOAD_BYTES and len(self.users) > 1:
            old = next(iter(self.users))
            for old_name in list(self.users[old]):
                self._drop(old, old_name)
            del self.users[old]

    def _drop(self, user: str, name: str) -> None:
        data = self.users.get(user, {}).pop(name, None)
        if data is not None:
            self.total -= len(data)
            self.info.pop((user, name), None)


class ComfySurface(Surface):
    ROUTES = ("/prompt", "/ws", "/history", "/view", "/queue", "/interrupt", "/object_info", "/system_stats",
              "/upload/image", "/embeddings", "/models")
    paths = ROUTES + tuple("/api" + p for p in ROUTES)
    form_routes = frozenset({"/upload/image", "/api/upload/image"})
    image_routes = form_routes
    untyped_json_routes = frozenset(prefix + path for prefix in ("", "/api")
                                    for path in ("/prompt", "/queue", "/interrupt", "/history"))

    def __init__(self, gateway: Gateway):
        super().__init__(gateway)
        self.prompts: OrderedDict[str, _Prompt] = OrderedDict()
        self.prompt_bytes = 0
        self.number = 0
        self.sockets: dict[tuple[str, str], _Outbox] = {}  # (user, clientId) -> its socket's outbox
        self.uploads = _Uploads()
        self._tasks: set[asyncio.Task] = set()
        self._stats: tuple[float, Any] | None = None

    def routes(self) -> list[web.AbstractRouteDef]:
        get, post = web.get, web.post
        routes = [("GET", "/ws", self.websocket), ("POST", "/prompt", self.post_prompt),
                  ("GET", "/prompt", self.get_prompt), ("GET", "/history", self.history),
                  ("GET", "/history/{prompt_id}", self.history_one), ("POST", "/history", self.post_history),
                  ("GET", "/view", self.view), ("GET", "/queue", self.queue), ("POST", "/queue", self.post_queue),
                  ("POST", "/interrupt", self.interrupt), ("GET", "/object_info", self.object_info),
                  ("GET", "/object_info/{node_class}", self.object_info_one),
                  ("GET", "/system_stats", self.system_stats), ("POST", "/upload/image", self.upload),
                  ("GET", "/embeddings", self.embeddings), ("GET", "/models", self.model_types),
                  ("GET", "/models/{folder}", self.model_files)]
        made = []
        for method, path, handler in routes:
            for prefix in ("", "/api"):  # ComfyUI answers both; newer front ends call /api/...
                made.append((get if method == "GET" else post)(prefix + path, handler))
        return made

    def render(self, problem: Problem) -> tuple[dict[str, Any], int]:
        if isinstance(problem, ComfyProblem):
            return {"error": problem.error.error, "node_errors": problem.error.node_errors}, problem.status
        return {"error": {"type": problem.code, "message": problem.message, "details": problem.field or "",
                          "extra_info": {}}, "node_errors": {}}, problem.status

    # -- /prompt ------------------------------------------------------------ #

    async def _catalog(self, user: str) -> Catalog:
        images = {m.name: list(m.loras) for m in await self.gateway.client.models()
                  if m.media == "image" and m.name in self.gateway.config.models
                  and JobKind.txt2img in m.kinds}
        uploads = {name: self.uploads.info[(user, name)] for name in self.uploads.of(user)}
        default = self.gateway.config.default_model
        return Catalog(models=images, default_model=default, uploads=uploads)

    async def post_prompt(self, request: web.Request) -> web.Response:
        caller: Caller = request["caller"]
        body = await read_json(request)
        if not isinstance(body, dict) or "prompt" not in body:
            raise ComfyProblem(WorkflowError({"type": "no_prompt", "message": "no prompt", "details": "send "
                                              "{\"prompt\": {node_id: {class_type, inputs}}, \"client_id\": ...}",
                                              "extra_info": {}}))
        client_id = body.get("client_id")
        if client_id is not None and not (isinstance(client_id, str) and 0 < len(client_id) <= 128):
            raise Problem(400, "bad_request", "client_id: a string of 1 to 128 characters", field="client_id")
        extra = body.get("extra_data") or {}
        if not isinstance(extra, dict):
            raise Problem(400, "bad_request", "extra_data must be an object", field="extra_data")
        try:
            plan = translate(body["prompt"], await self._catalog(caller.user))
        except WorkflowError as exc:
            raise ComfyProblem(exc) from None
        prompt_id = str(uuid.uuid4())
        inputs = await self._inputs(caller.user, plan)
        try:
            spec = self.gateway.owned(parse(JobSpec, {**plan.fields, "id": prompt_id}), caller)
            self.number += 1
            record = await self.gateway.submit(spec, caller, inputs)
        except Problem as problem:
            raise self._located(problem, plan) from None
        listener = self.gateway.streams.subscribe(record.spec.id, own=True)  # before any event is read
        extra = {**extra, **({"client_id": client_id} if client_id else {})}
        prompt = _Prompt(prompt_id, self.number, caller.user, client_id, body["prompt"], extra, plan,
                         len(json.dumps(body["prompt"])))
        self._remember(prompt)
        self._send_status(prompt.user, prompt.client_id)
        task = asyncio.ensure_future(self._follow(prompt, listener))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return web.json_response({"prompt_id": prompt_id, "number": prompt.number, "node_errors": {}})

    def _located(self, problem: Problem, plan: Plan) -> Problem:
        """The scheduler's refusal of a field, said of the node and input it came from."""
        if problem.status not in (400, 413, 422) or problem.field is None:
            return problem
        node, name = plan.origin.get(problem.field.partition(".")[0], (plan.sampler, problem.field))
        return ComfyProblem(WorkflowError.node(node, plan.classes[node], "value_not_valid", problem.message, name,
                                               plan.fields.get(problem.field), list(plan.outputs)))

    async def _inputs(self, user: str, plan: Plan) -> JobInputs | None:
        if plan.image is None:
            return None
        files = self.uploads.of(user)
        image, mask = files[plan.image], None  # the bytes taken now: an upload may be evicted meanwhile
        if plan.mask is not None:
            name, grow = plan.mask
            mask = await asyncio.to_thread(_mask, files[name], grow)  # decoding is no work for the event loop
        return JobInputs(image=image, mask=mask)

    def _remember(self, prompt: _Prompt) -> None:
        self.prompts[prompt.prompt_id] = prompt
        self.prompt_bytes += prompt.size
        while len(self.prompts) > KEEP_PROMPTS or self.prompt_bytes > KEEP_PROMPT_BYTES:
            ended = next((p for p in self.prompts.values() if p.state in ("success", "error")), None)
            if ended is None:
                break
            del self.prompts[ended.prompt_id]
            self.prompt_bytes -= ended.size

    async def get_prompt(self, request: web.Request) -> web.Response:
        return web.json_response({"exec_info": {"queue_remaining": self._remaining(request["caller"].user)}})

    def _remaining(self, user: str) -> int:
        return sum(1 for p in self.prompts.values() if p.user == user and p.state in ("pending", "running"))

    # -- following a prompt's job ------------------------------------------ #

    def _send(self, prompt: _Prompt, kind: str, data: dict[str, Any], record: bool = False) -> None:
        if record:
            data = {**data, "timestamp": int(time.time() * 1000)}
            prompt.messages.append([kind, data])
        self._to(prompt.user, prompt.client_id, json.dumps({"type": kind, "data": data}))

    def _to(self, user: str, client_id: str | None, message: str | bytes, droppable: bool = False) -> None:
        """To the socket of ``client_id``; a prompt posted without one is ComfyUI's broadcast, which goes to
        every socket of its user here (never to another user's)."""
        if client_id:
            outboxes = [self.sockets[user, client_id]] if (user, client_id) in self.sockets else []
        else:
            outboxes = [outbox for (owner, _), outbox in self.sockets.items() if owner == user]
        for outbox in outboxes:
            outbox.put(message, droppable)

    def _send_status(self, user: str, client_id: str | None) -> None:
        self._to(user, client_id, json.dumps({"type": "status", "data": {
            "status": {"exec_info": {"queue_remaining": self._remaining(user)}}}}))

    async def _follow(self, prompt: _Prompt, listener: Any) -> None:
        plan, pid = prompt.plan, prompt.prompt_id
        result: JobResult | None = None
        try:
            while True:
                event = await listener.get()
                if event is None:
                    break
                if isinstance(event, JobResult):
                    result = event
                    break
                if prompt.state == "pending" and (isinstance(event, (Progress, Preview)) or (
                        isinstance(event, JobEvent) and event.state in (JobState.loading, JobState.running))):
                    self._start(prompt)
                if isinstance(event, Progress):
                    self._send(prompt, "progress", {"value": event.step, "max": event.total, "prompt_id": pid,
                                                    "node": plan.sampler})
                elif isinstance(event, Preview):
                    self._to(prompt.user, prompt.client_id, _preview_frame(event), droppable=True)
        except Exception:  # a lost stream must end the prompt, not the server
            log.exception("following ComfyUI prompt %s failed", pid)
        finally:
            self.gateway.streams.unsubscribe(pid, listener)
        if result is None:
            result = self.gateway.client.result(pid)
        self._finish(prompt, result)

    def _start(self, prompt: _Prompt) -> None:
        prompt.state = "running"
        pid = prompt.prompt_id
        self._send(prompt, "execution_start", {"prompt_id": pid}, record=True)
        self._send(prompt, "execution_cached", {"nodes": [], "prompt_id": pid}, record=True)
        self._send(prompt, "executing", {"node": prompt.plan.sampler, "display_node": prompt.plan.sampler,
                                         "prompt_id": pid})

    def _finish(self, prompt: _Prompt, result: JobResult | None) -> None:
        plan, pid = prompt.plan, prompt.prompt_id
        state = result.job.state if result is not None else JobState.failed
        if state is JobState.done and result is not None:
            if prompt.state == "pending":
                self._start(prompt)
            images = [{"filename": _artifact_name(result, i), "subfolder": "", "type": "output"}
                      for i in range(len(result.outputs))]
            self._send(prompt, "executing", {"node": plan.decoder, "display_node": plan.decoder, "prompt_id": pid})
            for node, kind in plan.outputs.items():
                shown = [{**image, "type": kind} for image in images]
                prompt.outputs[node] = {"images": shown}
                self._send(prompt, "executing", {"node": node, "display_node": node, "prompt_id": pid})
                self._send(prompt, "executed", {"node": node, "display_node": node, "output": {"images": shown},
                                                "prompt_id": pid})
            self._send(prompt, "execution_success", {"prompt_id": pid}, record=True)
            prompt.state = "success"
        else:
            base = {"prompt_id": pid, "node_id": plan.sampler, "node_type": plan.classes[plan.sampler],
                    "executed": []}
            if state is JobState.cancelled:
                self._send(prompt, "execution_interrupted", base, record=True)
            else:
                reason = result.job.reason if result is not None else "the job's result never came"
                self._send(prompt, "execution_error", {**base, "exception_message": reason or "the job failed",
                                                       "exception_type": "atelier.JobFailed", "traceback": [],
                                                       "current_inputs": {}, "current_outputs": {}}, record=True)
            prompt.state = "error"
        self._send(prompt, "executing", {"node": None, "prompt_id": pid})
        self._send_status(prompt.user, prompt.client_id)

    # -- /ws ----------------------------------------------------------------- #

    async def websocket(self, request: web.Request) -> web.StreamResponse:
        caller: Caller = request["caller"]
        sid = request.query.get("clientId") or uuid.uuid4().hex
        if len(sid) > 128:
            raise Problem(400, "bad_request", "clientId: at most 128 characters", field="clientId")
        with self.gateway.hold(caller):  # a socket held open counts as an event stream does
            ws = web.WebSocketResponse(heartbeat=30.0, max_msg_size=1 << 16)
            await ws.prepare(request)
            key, outbox = (caller.user, sid), _Outbox()
            self.sockets[key] = outbox  # a reconnect with the same clientId takes the messages over
            outbox.put(json.dumps({"type": "status", "data": {
                "status": {"exec_info": {"queue_remaining": self._remaining(caller.user)}}, "sid": sid}}))
            writer = asyncio.ensure_future(self._write(ws, outbox))
            try:
                async for message in ws:  # clients send nothing ComfyUI acts on; this notices the close
                    if message.type == WSMsgType.ERROR:
                        break
            finally:
                writer.cancel()
                if self.sockets.get(key) is outbox:
                    del self.sockets[key]
                await ws.close()
            return ws

    async def _write(self, ws: web.WebSocketResponse, outbox: _Outbox) -> None:
        try:
            while not ws.closed:
                while not outbox.items:
                    outbox.ready.clear()
                    await outbox.ready.wait()
                if outbox.overflowed:
                    break
                message, _ = outbox.items.popleft()
                sent = ws.send_str(message) if isinstance(message, str) else ws.send_bytes(message)
                await asyncio.wait_for(sent, WRITE_TIMEOUT_S)
        except (asyncio.TimeoutError, ConnectionError, RuntimeError):
            pass
        await ws.close()

    # -- history, queue, interrupt ----------------------------------------- #

    def _mine(self, caller: Caller) -> list[_Prompt]:
        return [p for p in self.prompts.values() if caller.admin or p.user == caller.user]

    @staticmethod
    def _entry(prompt: _Prompt) -> dict[str, Any]:
        return {"prompt": prompt.item(), "outputs": prompt.outputs,
                "status": {"status_str": "success" if prompt.state == "success" else "error",
                           "completed": prompt.state == "success", "messages": prompt.messages},
                "meta": {node: {"node_id": node, "display_node": node, "parent_node": None, "real_node_id": node}
                         for node in prompt.outputs}}

    async def history(self, request: web.Request) -> web.Response:
        ended = [p for p in self._mine(request["caller"]) if p.state in ("success", "error")]
        if "max_items" in request.query:
            try:
                count = int(request.query["max_items"])
            except ValueError:
                raise Problem(400, "bad_request", "max_items must be a whole number", field="max_items") from None
            ended = ended[-count:] if count > 0 else []
        return web.json_response({p.prompt_id: self._entry(p) for p in ended})

    async def history_one(self, request: web.Request) -> web.Response:
        prompt = self.prompts.get(request.match_info["prompt_id"])
        caller: Caller = request["caller"]
        # Another user's prompt is as unknown as one never made: ComfyUI's {} (clients poll until it shows).
        if prompt is None or prompt.state not in ("success", "error") or not (caller.admin or
                                                                               prompt.user == caller.user):
            return web.json_response({})
        return web.json_response({prompt.prompt_id: self._entry(prompt)})

    async def post_history(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        mine = {p.prompt_id for p in self._mine(request["caller"]) if p.state in ("success", "error")}
        doomed = set(mine) if body.get("clear") else set()
        doomed |= {str(i) for i in body.get("delete") or [] if str(i) in mine}
        for prompt_id in doomed:
            prompt = self.prompts.pop(prompt_id)
            self.prompt_bytes -= prompt.size
        return web.Response(status=200)

    async def queue(self, request: web.Request) -> web.Response:
        mine = self._mine(request["caller"])
        return web.json_response({"queue_running": [p.item() for p in mine if p.state == "running"],
                                  "queue_pending": [p.item() for p in mine if p.state == "pending"]})

    async def post_queue(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        pending = {p.prompt_id for p in self._mine(request["caller"]) if p.state == "pending"}
        doomed = set(pending) if body.get("clear") else set()
        doomed |= {str(i) for i in body.get("delete") or [] if str(i) in pending}
        await self._cancel(doomed)
        return web.Response(status=200)

    async def interrupt(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        running = [p.prompt_id for p in self._mine(request["caller"]) if p.state == "running"]
        if body.get("prompt_id") is not None:  # newer ComfyUI: interrupt this one only
            running = [p for p in running if p == str(body["prompt_id"])]
        await self._cancel(running)
        return web.Response(status=200)

    async def _cancel(self, prompt_ids: Any) -> None:
        for prompt_id in prompt_ids:
            try:
                await self.gateway.client.cancel(prompt_id)
            except RemoteError as exc:  # ended meanwhile: nothing left to stop
                if exc.error.code is not ErrorCode.unknown_job:
                    raise

    @staticmethod
    async def _body(request: web.Request) -> dict[str, Any]:
        if not request.body_exists:
            return {}
        body = await read_json(request)
        if not isinstance(body, dict):
            raise Problem(400, "bad_request", "the body must be a JSON object")
        if not isinstance(body.get("delete", []) or [], list):
            raise Problem(400, "bad_request", "delete: a list of prompt ids", field="delete")
        return body

    # -- files ------------------------------------------------------------- #

    async def upload(self, request: web.Request) -> web.Response:
        caller: Caller = request["caller"]
        try:
            form = await request.post()
        except ValueError:
            raise Problem(400, "bad_request", "send the image as multipart/form-data") from None
        image = form.get("image")
        if not isinstance(image, web.FileField) or not image.filename:
            raise Problem(400, "bad_request", "image: a file (multipart field image, with a file name)", field="image")
        kind = str(form.get("type") or "input")
        if kind not in ("input", "temp"):
            raise Problem(400, "bad_request", "type: uploads are input (or temp) images", field="type")
        subfolder = str(form.get("subfolder") or "").strip("/")
        name = os.path.basename(image.filename.replace("\\", "/"))
        if not name or name.startswith(".") or ".." in subfolder.split("/") or len(subfolder) > 128 or len(name) > 128:
            raise Problem(400, "bad_request", "image: a plain file name (and a subfolder without ..)", field="image")
        data = image.file.read()
        try:
            with Image.open(io.BytesIO(data)) as opened:  # the header only: decoding is the runner's work
                info = (opened.width, opened.height, "A" in opened.getbands() or "transparency" in opened.info)
                opened.verify()
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError, ValueError, SyntaxError):
            raise Problem(400, "bad_request", "image: not an image Pillow can read (PNG, JPEG, WebP)",
                          field="image") from None
        if max(info[:2]) > MAX_UPLOAD_SIDE:
            raise Problem(413, "too_large", f"image: {info[0]}x{info[1]}; atelier takes images of at most "
                                            f"{MAX_UPLOAD_SIDE} pixels a side", field="image")
        files = self.uploads.of(caller.user)
        stem, dot, ext = name.rpartition(".") if "." in name else (name, "", "")
        key, n = f"{subfolder}/{name}" if subfolder else name, 1
        overwrite = str(form.get("overwrite", "")).lower() in ("true", "1")
        while not overwrite and key in files and files[key] != data:
            name = f"{stem} ({n}){dot}{ext}"
            key, n = f"{subfolder}/{name}" if subfolder else name, n + 1
        self.uploads.add(caller.user, key, data, info)
        return web.json_response({"name": name, "subfolder": subfolder, "type": kind})

    async def view(self, request: web.Request) -> web.StreamResponse:
        caller: Caller = request["caller"]
        name = request.query.get("filename", "")
        subfolder = request.query.get("subfolder", "").strip("/")
        kind = request.query.get("type", "output")
        if kind in ("input", "temp") and (data := self.uploads.of(caller.user).get(
                f"{subfolder}/{name}" if subfolder else name)) is not None:
            return web.Response(body=data, content_type=media_type_for(name) or "application/octet-stream")
        if kind not in ("output", "temp") or subfolder:
            raise Problem(404, "not_found", f"no file {name!r} of type {kind!r} among yours")
        prompt = self.prompts.get(name.rpartition("-")[0])
        try:
            return await self.gateway.output_file(name, caller, owner=prompt.user if prompt is not None else None)
        except Problem as problem:
            if problem.status != 403:
                raise
            # ComfyUI has no owners: another user's file is as absent as one never made.
            raise Problem(404, "not_found", f"no file {name!r} among yours") from None

    # -- what there is ----------------------------------------------------- #

    async def object_info(self, request: web.Request) -> web.Response:
        catalog = await self._catalog(request["caller"].user)
        return web.json_response({name: _node_info(name, catalog) for name in NODES})

    async def object_info_one(self, request: web.Request) -> web.Response:
        name = request.match_info["node_class"]
        if name not in NODES:
            return web.json_response({})
        return web.json_response({name: _node_info(name, await self._catalog(request["caller"].user))})

    async def system_stats(self, request: web.Request) -> web.Response:
        now = time.monotonic()
        if self._stats is None or now - self._stats[0] > STATS_TTL_S:  # a flood asks the scheduler once a second
            self._stats = (now, await self.gateway.client.status())
        status = self._stats[1]
        devices = []
        for runner in status.runners:
            capabilities = runner.capabilities
            device = capabilities.device or "cpu"
            kind, _, index = device.partition(":")
            devices.append({"name": capabilities.device_name or device, "type": kind,
                            "index": int(index) if index.isdigit() else None, "vram_total": 0, "vram_free": 0,
                            "torch_vram_total": 0, "torch_vram_free": 0})
        try:
            pages, page = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
            free = os.sysconf("SC_AVPHYS_PAGES") * page
        except (ValueError, OSError):
            pages = page = free = 0
        return web.json_response({"system": {
            "os": os.name, "ram_total": pages * page, "ram_free": free, "comfyui_version": "atelier",
            "python_version": sys.version, "pytorch_version": "", "embedded_python": False, "argv": []},
            "devices": devices})

    async def embeddings(self, request: web.Request) -> web.Response:
        return web.json_response([])  # atelier has no textual-inversion embeddings

    async def model_types(self, request: web.Request) -> web.Response:
        return web.json_response(["checkpoints", "loras"])

    async def model_files(self, request: web.Request) -> web.Response:
        catalog = await self._catalog(request["caller"].user)
        folder = request.match_info["folder"]
        if folder == "checkpoints":
            return web.json_response(list(catalog.models))
        if folder == "loras":
            return web.json_response(sorted({lora for loras in catalog.models.values() for lora in loras}))
        raise Problem(404, "not_found", f"no model folder {folder!r}: atelier has checkpoints and loras")


def _mask(data: bytes, grow: int) -> bytes:
    """ComfyUI's mask of an image, 1 - alpha (transparent: paint anew), as atelier's: white where it paints."""
    with Image.open(io.BytesIO(data)) as source:
        alpha = source.convert("RGBA").getchannel("A").point(lambda a: 255 - a)
    if grow:
        alpha = alpha.filter(ImageFilter.MaxFilter(2 * grow + 1))
    buffer = io.BytesIO()
    alpha.save(buffer, format="PNG")
    return buffer.getvalue()


def _artifact_name(result: JobResult, index: int) -> str:
    record = result.job
    if index < len(record.artifacts):
        return record.artifacts[index].rsplit("/", 1)[-1]
    return f"{record.spec.id}-{index}.png"


def _preview_frame(preview: Preview) -> bytes:
    """A preview as ComfyUI frames one: PREVIEW_IMAGE, the image type (1 JPEG, 2 PNG), big-endian, then the bytes."""
    data = bytes(preview.image)
    if preview.media_type == "image/png":
        kind = 2
    elif preview.media_type == "image/jpeg":
        kind = 1
    else:  # ComfyUI's clients read only these two
        with Image.open(io.BytesIO(data)) as image:
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, format="JPEG", quality=90)
        data, kind = buffer.getvalue(), 1
    return struct.pack(">II", PREVIEW_IMAGE, kind) + data


_INT = {"seed": {"default": 0, "min": 0, "max": 2**64 - 1}, "noise_seed": {"default": 0, "min": 0, "max": 2**64 - 1},
        "steps": {"default": 20, "min": 1, "max": 500}, "start_at_step": {"default": 0, "min": 0, "max": 10000},
        "end_at_step": {"default": 10000, "min": 0, "max": 10000},
        "width": {"default": 512, "min": 8, "max": 8192, "step": 8},
        "height": {"default": 512, "min": 8, "max": 8192, "step": 8},
        "batch_size": {"default": 1, "min": 1, "max": 16}, "grow_mask_by": {"default": 6, "min": 0, "max": 64}}
_FLOAT = {"cfg": {"default": 8.0, "min": 0.0, "max": 50.0, "step": 0.1, "round": 0.01},
          "denoise": {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01},
          "strength_model": {"default": 1.0, "min": -4.0, "max": 4.0, "step": 0.01},
          "strength_clip": {"default": 1.0, "min": -4.0, "max": 4.0, "step": 0.01}}
_CATEGORY = {"CheckpointLoaderSimple": "loaders", "LoraLoader": "loaders", "LoraLoaderModelOnly": "loaders",
             "CLIPTextEncode": "conditioning", "EmptyLatentImage": "latent", "KSampler": "sampling",
             "KSamplerAdvanced": "sampling", "VAEDecode": "latent", "VAEEncode": "latent",
             "VAEEncodeForInpaint": "latent/inpaint", "SetLatentNoiseMask": "latent/inpaint", "LoadImage": "image",
             "SaveImage": "image", "PreviewImage": "image"}


def _node_info(name: str, catalog: Catalog) -> dict[str, Any]:
    """A node as ComfyUI's /object_info describes one, with the choices atelier takes."""
    choices = {"ckpt_name": list(catalog.models), "sampler_name": list(SAMPLERS), "scheduler": list(SCHEDULERS),
               "lora_name": sorted({lora for loras in catalog.models.values() for lora in loras}),
               "image": sorted(catalog.uploads), "add_noise": ["enable"], "return_with_leftover_noise": ["disable"]}
    inputs, outputs = NODES[name]
    required: dict[str, Any] = {}
    for input_name, kind in inputs.items():
        if kind == "CHOICE":
            required[input_name] = [choices[input_name]] + ([{"image_upload": True}] if input_name == "image" else [])
        elif kind == "INT":
            required[input_name] = ["INT", _INT[input_name]]
        elif kind == "FLOAT":
            required[input_name] = ["FLOAT", _FLOAT[input_name]]
        elif kind == "STRING":
            required[input_name] = ["STRING", {"multiline": True, "dynamicPrompts": True} if input_name == "text"
                                    else {"default": "ComfyUI"}]
        else:
            required[input_name] = [kind]
    described: dict[str, Any] = {"required": required}
    if name in ("SaveImage", "PreviewImage"):
        described["hidden"] = {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}
    return {"input": described, "input_order": {key: list(value) for key, value in described.items()},
            "output": list(outputs), "output_is_list": [False] * len(outputs), "output_name": list(outputs),
            "name": name, "display_name": name, "description": "", "python_module": "nodes",
            "category": _CATEGORY[name], "output_node": name in ("SaveImage", "PreviewImage")}
