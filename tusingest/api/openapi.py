"""The OpenAPI 3.1 document of the REST facade under /api, served at GET /openapi.json.

It is generated, not kept: the paths from the routes the app registers (each /api route is an
``ApiRoute`` carrying its ``Operation``, declared next to the route), the schemas from the models
the handlers build their answers from and validate requests with (api/models.py). A route under
/api without an ``Operation`` stops the document, and so the app, from being built.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaMode, models_json_schema
from pydantic_core import CoreSchema
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

import tusingest
from tusingest.api.models import ErrorBody

TITLE = "tusingest — ArtStore Ingester API"
API_PREFIX = "/api/"
_PATH_PARAMETER = re.compile(r"\{(\w+)(?::\w+)?\}")
# What any /api operation may answer before its handler runs: the authentication middleware (app.py) and
# the rate limits (api/limits.py). An operation that declares one of these statuses itself keeps its own.
GUARD_ERRORS: Mapping[int, str] = {
    401: "invalid_token: no Bearer token, or one that is malformed, expired, not yet valid or badly signed",
    403: "insufficient_scope: the token's role and scopes do not allow the operation",
    429: "rate_limited: too many creations, concurrent uploads or bytes per second; see Retry-After",
    503: "auth_unavailable: the key set cannot be had right now; see Retry-After",
}
BEARER = "bearerAuth"


@dataclass(frozen=True, slots=True)
class Operation:
    """What the document says of one route: declared beside the route, rendered here.

    ``responses`` maps a status to (description, body model or None); ``errors`` maps a status to
    the codes it may carry, each answered with ``ErrorBody``. ``request`` is the body model, sent
    as ``media_type`` (``encoding``: a multipart part's content type). ``streamed`` maps a status to
    the media type of a stream it answers with (text, no schema: Server-Sent Events); the models
    of what the stream carries go in ``extra_models``, so the document defines them."""

    operation_id: str
    tag: str
    summary: str
    responses: Mapping[int, tuple[str, type[BaseModel] | None]]
    errors: Mapping[int, str] = field(default_factory=dict)
    request: type[BaseModel] | None = None
    media_type: str = "application/json"
    encoding: Mapping[str, str] = field(default_factory=dict)
    parameters: Sequence[Mapping[str, Any]] = ()
    streamed: Mapping[int, str] = field(default_factory=dict)
    extra_models: Sequence[type[BaseModel]] = ()

    def models(self) -> Iterable[tuple[type[BaseModel], JsonSchemaMode]]:
        if self.request is not None:
            yield self.request, "validation"
        for _, model in self.responses.values():
            if model is not None:
                yield model, "serialization"
        for model in self.extra_models:
            yield model, "serialization"
        yield ErrorBody, "serialization"  # the guards' refusals (GUARD_ERRORS), at the least

    def render(self) -> dict[str, Any]:
        rendered: dict[str, Any] = {"operationId": self.operation_id, "tags": [self.tag], "summary": self.summary}
        if self.parameters:
            rendered["parameters"] = [dict(parameter) for parameter in self.parameters]
        if self.request is not None:
            content: dict[str, Any] = {"schema": _ref(self.request)}
            if self.encoding:
                content["encoding"] = {part: {"contentType": kind} for part, kind in self.encoding.items()}
            rendered["requestBody"] = {"required": True, "content": {self.media_type: content}}
        responses: dict[str, Any] = {}
        for status, (description, model) in self.responses.items():
            responses[str(status)] = {"description": description} if model is None else _json(description, model)
            if status in self.streamed:
                responses[str(status)]["content"] = {self.streamed[status]: {"schema": {"type": "string"}}}
        for status, description in {**GUARD_ERRORS, **self.errors}.items():
            responses[str(status)] = _json(description, ErrorBody)
        rendered["responses"] = dict(sorted(responses.items()))
        return rendered


class ApiRoute(Route):
    """A route under /api with its documentation: one method, one ``Operation``."""

    def __init__(
        self, path: str, endpoint: Callable[[Request], Awaitable[Response]], method: str, operation: Operation
    ) -> None:
        super().__init__(path, endpoint, methods=[method])
        self.method = method
        self.operation = operation

    def with_endpoint(self, endpoint: Callable[[Request], Awaitable[Response]]) -> ApiRoute:
        return ApiRoute(self.path, endpoint, self.method, self.operation)


class UndocumentedRoute(ValueError):
    """A route under /api that is not an ApiRoute: the document would not describe it."""


def path_parameter(name: str, schema: Mapping[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": dict(schema), "description": description}


def header_parameter(name: str, schema: Mapping[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "header", "required": False, "schema": dict(schema), "description": description}


class _ComponentSchema(GenerateJsonSchema):
    """Pydantic's JSON Schema without a ``title`` on every property: the property name says it already."""

    def field_title_should_be_set(self, schema: CoreSchema) -> bool:
        return False


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _json(description: str, model: type[BaseModel]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(model)}}}


def _api_routes(routes: Iterable[BaseRoute]) -> list[ApiRoute]:
    documented = []
    for route in routes:
        if not isinstance(route, Route) or not route.path.startswith(API_PREFIX):
            continue
        if not isinstance(route, ApiRoute):
            methods = ", ".join(sorted(route.methods or ()))
            raise UndocumentedRoute(f"{methods} {route.path} is not an ApiRoute: declare its Operation with it")
        documented.append(route)
    return documented


def _components(routes: Sequence[ApiRoute]) -> dict[str, Any]:
    modes = list(dict.fromkeys(pair for route in routes for pair in route.operation.models()))
    _, definitions = models_json_schema(
        modes, ref_template="#/components/schemas/{model}", schema_generator=_ComponentSchema
    )
    schemas: dict[str, Any] = definitions.get("$defs", {})
    return schemas


def openapi_document(routes: Iterable[BaseRoute]) -> dict[str, Any]:
    """The document of the /api routes among ``routes`` (the app's route table)."""
    documented = _api_routes(routes)
    paths: dict[str, dict[str, Any]] = {}
    for route in documented:
        path = _PATH_PARAMETER.sub(r"{\1}", route.path)  # OpenAPI writes {id}, Starlette may write {id:str}
        paths.setdefault(path, {})[route.method.lower()] = route.operation.render()
    return {
        "openapi": "3.1.0",
        "info": {
            "title": TITLE,
            "version": tusingest.__version__,
            "description": 'The REST facade of the ArtStore Ingester. Errors are {"error": code, "message": text}.',
        },
        "tags": [
            {"name": "uploads", "description": "files in, by form upload (tus lives under its own base path)"},
            {"name": "files", "description": "stored files"},
            {"name": "transfers", "description": "moving files between Storage Elements"},
        ],
        "paths": paths,
        # Every operation wants the token (without a key configured the server serves anonymous callers on
        # loopback only, and ignores the header).
        "security": [{BEARER: []}],
        "components": {
            "schemas": _components(documented),
            "securitySchemes": {
                BEARER: {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "JWT",
                    "description": "an ArtStore token: RS256 or ES256 (HS256 in development)",
                }
            },
        },
    }


def openapi_routes(routes: Iterable[BaseRoute]) -> list[Route]:
    """GET /openapi.json, the document of ``routes`` built now: an undocumented route fails here."""
    document = openapi_document(routes)

    async def openapi_json(request: Request) -> JSONResponse:
        return JSONResponse(document)

    return [Route("/openapi.json", openapi_json, methods=["GET"], include_in_schema=False)]


__all__ = ["ApiRoute", "Operation", "UndocumentedRoute", "openapi_document", "openapi_routes"]
