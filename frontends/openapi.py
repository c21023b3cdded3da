"""The OpenAPI document of the HTTP API, built from the pydantic models the server validates with.

The request schemas are those of the very models that parse the bodies (``JobSpec``, the OpenAI
and A1111 requests), so the document cannot promise a field the server refuses or the reverse.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from pydantic import BaseModel, TypeAdapter
from pydantic.json_schema import models_json_schema

from atelier.jobs import JobId, Lease
from frontends import a1111, api, cluster_events, leases, openai_images, operator, trainings

_REF = "#/components/schemas/{model}"


def _ref(model: type[BaseModel]) -> dict[str, Any]:
    return {"$ref": _REF.format(model=model.__name__)}


def _body(model: type[BaseModel]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": _ref(model)}}}


def _answer(description: str, model: type[BaseModel] | None = None, *, media: str = "application/json",
            schema: dict[str, Any] | None = None) -> dict[str, Any]:
    if model is None and schema is None:
        return {"description": description}
    return {"description": description, "content": {media: {"schema": schema or _ref(model)}}}


def _errors(model: type[BaseModel], *codes: int) -> dict[str, Any]:
    words = {400: "Not JSON, or a bad value (OpenAI's status)", 401: "No or unknown bearer token",
             403: "Another user's job, a permission the token lacks, or a change asked by another site's page",
             404: "No such job or model", 409: "The job was cancelled: no images",
             413: "A body over the route's cap (1 MiB; 64 MiB where images travel), or an input image over the "
                  "size cap",
             415: "A body not sent as application/json", 422: "A field is wrong: the error names it",
             429: "Rate limited, queue full, or too many streams open: see Retry-After",
             503: "The scheduler did not answer, or the server holds its most streams",
             504: "No images in time: the job was cancelled"}
    return {str(code): _answer(words[code], model) for code in codes}


# The id's own rules: a path that breaks them names no job (404), and a client can tell beforehand.
_JOB_ID = {"name": "job_id", "in": "path", "required": True, "schema": TypeAdapter(JobId).json_schema()}


_NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string", "minLength": 1,
                                                                  "maxLength": 64}}


@cache
def _schemas() -> dict[str, Any]:
    models = [api.JobRequest, api.JobView, api.ApiError, api.ModelList, openai_images.OpenAIImageRequest,
              openai_images.OpenAIImagesResponse, openai_images.OpenAIError, a1111.A1111Txt2Img,
              a1111.A1111Img2Img, a1111.A1111Images, a1111.A1111Model, a1111.A1111Progress, a1111.A1111Error,
              trainings.TrainingRequest, trainings.LoraShare, trainings.LoraListing, leases.LeaseRequest,
              leases.LeaseListing, Lease, operator.ModelChoice, operator.PriorityChoice, operator.ControlsView,
              operator.CatalogChangesView, cluster_events.Me,
              cluster_events.ClusterEventView]
    _, top = models_json_schema([(m, "validation") for m in models], ref_template=_REF)
    return top["$defs"]


_NODE = {"name": "node", "in": "path", "required": True, "schema": {"type": "string", "minLength": 1,
                                                                  "maxLength": 128}}


def _operator_paths() -> dict[str, Any]:
    """frontends/operator.py's routes: an admin's; a user's token gets 403 on each."""
    controls = {"200": _answer("The controls now", operator.ControlsView)}
    choice = {"required": False, "content": {"application/json": {"schema": _ref(operator.ModelChoice)}}}
    admin = (400, 401, 403, 413, 415, 422, 503)
    return {
        "/v1/admin/controls": {"get": {"summary": "Admins: what is paused, and each node's state",
                                       "responses": {**controls, **_errors(api.ApiError, 401, 403, 503)}}},
        "/v1/admin/pause": {"post": {"summary": "Admins: start nothing new (the queue, or one model's jobs)",
                                     "requestBody": choice,
                                     "responses": {**controls, **_errors(api.ApiError, *admin)}}},
        "/v1/admin/resume": {"post": {"summary": "Admins: start again what a pause held (no model: everything)",
                                      "requestBody": choice,
                                      "responses": {**controls, **_errors(api.ApiError, *admin)}}},
        "/v1/admin/nodes/{node}/drain": {"post": {
            "summary": "Admins: the node's runners finish their batches and take nothing new", "parameters": [_NODE],
            "responses": {**controls, **_errors(api.ApiError, 401, 403, 404, 422, 503)}}},
        "/v1/admin/nodes/{node}/resume": {"post": {
            "summary": "Admins: a drained node serves again", "parameters": [_NODE],
            "responses": {**controls, **_errors(api.ApiError, 401, 403, 404, 409, 503)}}},
        "/v1/jobs/{job_id}/front": {"post": {
            "summary": "Admins: a queued job starts next, before every other", "parameters": [_JOB_ID],
            "responses": {"200": _answer("The job", api.JobView), **_errors(api.ApiError, 401, 403, 404, 409, 503)}}},
        "/v1/jobs/{job_id}/priority": {"post": {
            "summary": "Admins: a queued job's priority", "parameters": [_JOB_ID],
            "requestBody": _body(operator.PriorityChoice),
            "responses": {"200": _answer("The job", api.JobView),
                          **_errors(api.ApiError, 400, 401, 403, 404, 409, 413, 415, 422, 503)}}},
        "/v1/admin/catalog/reload": {"post": {
            "summary": "Admins: the scheduler reads its config file's models again (an invalid file changes nothing)",
            "responses": {"200": _answer("What changed", operator.CatalogChangesView),
                          **_errors(api.ApiError, 401, 403, 422, 503)}}},
    }


def document(base_url: str) -> dict[str, Any]:
    native = (401, 403, 404, 422, 429, 503)
    posted = (403, 413, 415)  # the guard's: another site's page, a body too large, not JSON
    synchronous = (409, 429, 503, 504)  # the OpenAI and A1111 calls wait for the job: it may be cancelled
    paths = {
        "/v1/jobs": {
            "post": {"summary": "Queue a job", "requestBody": _body(api.JobRequest),
                     "parameters": [{"name": "Idempotency-Key", "in": "header", "required": False,
                                     "description": "A retry with the same key gets the job the first try made",
                                     "schema": {"type": "string", "minLength": 1, "maxLength": 200,
                                                "pattern": "^[\\x21-\\x7e]+$"}}],
                     "responses": {"202": _answer("Queued", api.JobView),
                                   **_errors(api.ApiError, 400, *posted, *native)}},
            "get": {"summary": "The caller's jobs, newest first (an admin's: any user's, or the whole queue)",
                    "parameters": [{"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1,
                                                                               "maximum": 1000}},
                                   {"name": "user", "in": "query", "description": "admins: this user's jobs",
                                    "schema": {"type": "string", "minLength": 1, "maxLength": 128}},
                                   {"name": "all", "in": "query", "description": "admins: the jobs running and "
                                    "queued, in their order", "schema": {"type": "boolean"}}],
                    "responses": {"200": _answer("Jobs", schema={"type": "object", "properties": {
                        "jobs": {"type": "array", "items": _ref(api.JobView)}}}),
                        **_errors(api.ApiError, 401, 403, 422, 503)}},
        },
        "/v1/jobs/{job_id}": {
            "get": {"summary": "A job", "parameters": [_JOB_ID],
                    "responses": {"200": _answer("The job", api.JobView), **_errors(api.ApiError, *native)}},
            "delete": {"summary": "Cancel a job (a running one stops at its next step)", "parameters": [_JOB_ID],
                       "responses": {"200": _answer("The job", api.JobView),
                                     **_errors(api.ApiError, *native)}},
        },
        "/v1/jobs/{job_id}/events": {
            "get": {"summary": "Server-Sent Events: state, progress, preview (a data URL), then result",
                    "parameters": [_JOB_ID],
                    "responses": {"200": _answer("The stream", media="text/event-stream", schema={"type": "string"}),
                                  **_errors(api.ApiError, *native)}},
        },
        "/v1/trainings": {
            "post": {"summary": "Queue a LoRA training (JSON with base64 images, or multipart: images parts, the "
                                "settings as text parts, captions once per image)",
                     "requestBody": _body(trainings.TrainingRequest),
                     "responses": {"202": _answer("Queued", api.JobView),
                                   **_errors(api.ApiError, 400, *posted, *native)}},
        },
        "/v1/loras": {"get": {"summary": "The trained LoRAs the caller may use: their own, then those lent them",
                              "responses": {"200": _answer("LoRAs", trainings.LoraListing),
                                            **_errors(api.ApiError, 401, 503)}}},
        "/v1/loras/{name}": {"delete": {"summary": "Delete one of the caller's LoRAs", "parameters": [_NAME],
                                        "responses": {"200": _answer("What is left", trainings.LoraListing),
                                                      **_errors(api.ApiError, 401, 403, 404, 422, 503)}}},
        "/v1/loras/{name}/share": {"put": {"summary": "Lend one of the caller's LoRAs to these users",
                                           "parameters": [_NAME], "requestBody": _body(trainings.LoraShare),
                                           "responses": {"200": _answer("The caller's LoRAs", trainings.LoraListing),
                                                         **_errors(api.ApiError, 400, 401, 403, 404, 413, 415,
                                                                   422, 503)}}},
        "/v1/loras/{name}/file": {"get": {"summary": "One of the caller's LoRA files (?format=kohya: kohya's)",
                                          "parameters": [_NAME, {"name": "format", "in": "query", "schema": {
                                              "type": "string", "enum": ["diffusers", "kohya"]}}],
                                          "responses": {"200": _answer("The file", media="application/octet-stream",
                                                                       schema={"type": "string", "format": "binary"}),
                                                        **_errors(api.ApiError, 401, 404, 422, 503)}}},
        "/v1/leases": {
            "get": {"summary": "VRAM leases: pending, granted, the last ended (admins)",
                    "responses": {"200": _answer("Leases", leases.LeaseListing),
                                  **_errors(api.ApiError, 401, 403, 503)}},
            "post": {"summary": "Lend device memory to another program; answered once it is free (admins)",
                     "requestBody": _body(leases.LeaseRequest),
                     "responses": {"201": _answer("Granted", Lease),
                                   **_errors(api.ApiError, 400, *posted, 401, 409, 422, 503)}},
        },
        "/v1/leases/{lease_id}": {"delete": {"summary": "Give a lease's memory back to atelier (admins)",
                                             "parameters": [{"name": "lease_id", "in": "path", "required": True,
                                                             "schema": {"type": "string", "minLength": 1,
                                                                        "maxLength": 64}}],
                                             "responses": {"200": _answer("The ended lease", Lease),
                                                           **_errors(api.ApiError, 401, 403, 404, 503)}}},
        "/v1/models": {"get": {"summary": "The catalog (OpenAI's model list, with atelier's fields)",
                               "responses": {"200": _answer("Models", api.ModelList), **_errors(api.ApiError, 401)}}},
        "/v1/nodes": {"get": {"summary": "Runners, staged models and the queue (the jobs on the runners: admins)",
                              "responses": {"200": _answer("Nodes", schema={"type": "object"}),
                                            **_errors(api.ApiError, 401)}}},
        "/v1/artifacts/{name}": {
            "get": {"summary": "An output file", "parameters": [{"name": "name", "in": "path", "required": True,
                                                                  "schema": {"type": "string"}}],
                    "responses": {"200": _answer("The file", media="image/png", schema={"type": "string",
                                                                                        "format": "binary"}),
                                  **_errors(api.ApiError, 401, 403, 404)}},
        },
        "/v1/images/generations": {
            "post": {"summary": "OpenAI: create images", "requestBody": _body(openai_images.OpenAIImageRequest),
                     "responses": {"200": _answer("Images", openai_images.OpenAIImagesResponse),
                                   **_errors(openai_images.OpenAIError, 400, 401, 403, 404, 413, 415, *synchronous)}},
        },
        "/sdapi/v1/txt2img": {
            "post": {"summary": "AUTOMATIC1111: text to image", "requestBody": _body(a1111.A1111Txt2Img),
                     "responses": {"200": _answer("Images", a1111.A1111Images),
                                   **_errors(a1111.A1111Error, 400, 401, 404, 422, *posted, *synchronous)}},
        },
        "/sdapi/v1/img2img": {
            "post": {"summary": "AUTOMATIC1111: image to image", "requestBody": _body(a1111.A1111Img2Img),
                     "responses": {"200": _answer("Images", a1111.A1111Images),
                                   **_errors(a1111.A1111Error, 400, 401, 404, 422, *posted, *synchronous)}},
        },
        "/sdapi/v1/sd-models": {"get": {"summary": "AUTOMATIC1111: the models", "responses": {
            "200": _answer("Models", schema={"type": "array", "items": _ref(a1111.A1111Model)}),
            **_errors(a1111.A1111Error, 401)}}},
        "/sdapi/v1/progress": {"get": {"summary": "AUTOMATIC1111: progress of the caller's latest job",
                                       "parameters": [{"name": "skip_current_image", "in": "query",
                                                       "schema": {"type": "boolean"}}],
                                       "responses": {"200": _answer("Progress", a1111.A1111Progress),
                                                     **_errors(a1111.A1111Error, 401, 422)}}},
        "/sdapi/v1/interrupt": {"post": {"summary": "AUTOMATIC1111: cancel the caller's latest job",
                                         "responses": {"200": _answer("Done", schema={"type": "object"}),
                                                       **_errors(a1111.A1111Error, 401, *posted)}}},
        **_operator_paths(),
        "/metrics": {"get": {"summary": "Prometheus metrics (with tokens configured, any token may read them)",
                             "responses": {"200": _answer("Metrics", media="text/plain", schema={"type": "string"}),
                                           **_errors(api.ApiError, 401)}}},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "atelier", "version": "1", "description": "Serve diffusion models to many people at once."},
        "servers": [{"url": base_url}],
        "security": [{"bearer": []}],
        "components": {"schemas": _schemas(),
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "paths": paths,
    }
