"""The OpenAPI document of /api is valid OpenAPI 3.1, names exactly the /api routes the app has, and is true of
the live app: schemathesis sends generated requests over HTTP and checks every answer against the document."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import hypothesis
import jsonschema_rs
import pytest
import requests
import schemathesis
from schemathesis import Case
from schemathesis.checks import CheckFunction, not_a_server_error
from schemathesis.core.result import Err
from schemathesis.errors import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from starlette.routing import BaseRoute, Mount, Route

from tests.fixtures.jwt import rsa_key, token
from tests.fixtures.server import LiveServer, ServerFactory, base_settings
from tusingest.api.models import TransferRequest
from tusingest.api.openapi import ApiRoute, Operation, UndocumentedRoute, openapi_document
from tusingest.app import build_app

CHECKS: list[CheckFunction] = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
# Few examples, always the same ones, never shrunk: a contract check that takes seconds, not a fuzzing campaign.
EXAMPLES = hypothesis.settings(
    max_examples=15,
    derandomize=True,
    deadline=None,
    database=None,
    phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
    suppress_health_check=list(hypothesis.HealthCheck),
    print_blob=False,
)
HTTP_METHODS = frozenset({"get", "put", "post", "delete", "patch", "options", "head", "trace"})
CONVERTER = re.compile(r"\{(\w+):\w+\}")


def documented_operations(document: dict[str, Any]) -> set[tuple[str, str]]:
    return {
        (method.upper(), path) for path, item in document["paths"].items() for method in item if method in HTTP_METHODS
    }


def app_operations(routes: Iterable[BaseRoute], prefix: str = "") -> Iterator[tuple[str, str]]:
    """(method, path) for every route under /api, paths as OpenAPI writes them ({id}, not {id:str})."""
    for route in routes:
        if isinstance(route, Mount):
            yield from app_operations(route.routes, prefix + route.path)
        elif isinstance(route, Route) and (prefix + route.path).startswith("/api/"):
            path = CONVERTER.sub(r"{\1}", prefix + route.path)
            # Starlette answers HEAD for every GET route on its own; the document describes what we wrote.
            yield from ((method, path) for method in route.methods or () if method != "HEAD")


def describe(failure: BaseException) -> str:
    """A failure as the route's author needs it: which check, what came back, how to replay it."""
    if isinstance(failure, FailureGroup):
        text = failure.message  # schemathesis' report: the checks, the status and body, a curl command
    elif isinstance(failure, BaseExceptionGroup):
        text = "\n".join(describe(inner) for inner in failure.exceptions)
    else:
        text = f"{type(failure).__name__}: {failure}"
    return "\n".join([text, *getattr(failure, "__notes__", [])])


def app_document(tmp_path: Path, sqlite_url: str) -> dict[str, Any]:
    # The document is generated from the app's route table (issue 11), so it is asked of an app.
    return openapi_document(build_app(base_settings(tmp_path, sqlite_url)).routes)


def exercise(base_url: str, document: dict[str, Any], headers: dict[str, str] | None = None) -> list[str]:
    """Run every documented operation against the server (each request with ``headers``); one report per
    operation that broke the contract."""
    schema = schemathesis.openapi.from_dict(document)
    reports: list[str] = []
    with requests.Session() as session:
        for result in schema.get_all_operations():
            if isinstance(result, Err):
                reports.append(f"unusable operation: {result.err()}")
                continue
            operation = result.ok()

            @EXAMPLES
            @hypothesis.given(case=operation.as_strategy())
            def call(case: Case[Any]) -> None:
                response = case.call(base_url=base_url, session=session, timeout=10, headers=headers)
                case.validate_response(response, checks=CHECKS)

            try:
                call()
            except (Exception, BaseExceptionGroup) as failure:  # schemathesis raises FailureGroup, not an Exception
                reports.append(f"{operation.label}\n{describe(failure)}")
    return reports


def test_document_is_valid_openapi_3_1(tmp_path: Path, sqlite_url: str) -> None:
    document = app_document(tmp_path, sqlite_url)

    schemathesis.openapi.from_dict(document).validate()  # the official OpenAPI 3.1 meta-schema

    assert document["openapi"] == "3.1.0"
    for name, component in document["components"]["schemas"].items():
        assert jsonschema_rs.meta.is_valid(component), f"components/schemas/{name} is not JSON Schema 2020-12"
    operation_ids = [
        operation["operationId"]
        for item in document["paths"].values()
        for method, operation in item.items()
        if method in HTTP_METHODS
    ]
    assert len(operation_ids) == len(set(operation_ids))
    for path, item in document["paths"].items():
        for method, operation in item.items():
            declared = {p["name"] for p in operation.get("parameters", ()) if p["in"] == "path"}
            assert declared == set(re.findall(r"\{(\w+)\}", path)), f"{method.upper()} {path}: path parameters"


def test_every_api_route_is_documented_and_every_documented_route_exists(tmp_path: Path, sqlite_url: str) -> None:
    app = build_app(base_settings(tmp_path, sqlite_url))

    in_app = set(app_operations(app.routes))

    in_document = documented_operations(openapi_document(app.routes))
    undocumented, missing = sorted(in_app - in_document), sorted(in_document - in_app)
    assert (undocumented, missing) == ([], []), f"undocumented routes: {undocumented}; routes missing: {missing}"


async def test_live_app_serves_the_document_at_openapi_json(
    sqlite_server: LiveServer, tmp_path: Path, sqlite_url: str
) -> None:
    async with sqlite_server.client() as client:
        response = await client.get("/openapi.json")

    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == app_document(tmp_path, sqlite_url)


async def test_live_app_answers_every_operation_as_documented(
    start_server: ServerFactory, tmp_path: Path, sqlite_url: str
) -> None:
    server = await start_server()

    # schemathesis speaks blocking HTTP; the server runs on this event loop, so the client gets a thread.
    reports = await asyncio.to_thread(exercise, server.url, app_document(tmp_path, sqlite_url))

    if reports:
        pytest.fail("\n\n".join(reports), pytrace=False)


@pytest.mark.parametrize(
    "identity",
    [None, {"sub": "alice", "role": "USER"}, {"sub": "reader", "role": "READONLY"}, {"sub": "root", "role": "ADMIN"}],
    ids=["no-token", "user", "readonly", "admin"],
)
async def test_a_server_with_a_key_answers_every_operation_as_documented_with_and_without_a_token(
    keyed_server: LiveServer, tmp_path: Path, sqlite_url: str, identity: dict[str, str] | None
) -> None:
    headers = None if identity is None else {"Authorization": f"Bearer {token(rsa_key(), **identity)}"}

    reports = await asyncio.to_thread(exercise, keyed_server.url, app_document(tmp_path, sqlite_url), headers)

    if reports:
        pytest.fail("\n\n".join(reports), pytrace=False)
    if identity is None:  # and the guard really stood in front of every operation
        async with keyed_server.client() as client:
            refused = await client.delete("/api/files/0123456789abcdef0123456789abcdef")
        assert (refused.status_code, refused.json()["error"]) == (401, "invalid_token")


def test_the_document_says_every_operation_wants_a_bearer_token(tmp_path: Path, sqlite_url: str) -> None:
    document = app_document(tmp_path, sqlite_url)

    assert document["security"] == [{"bearerAuth": []}]
    assert document["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    for path, item in document["paths"].items():
        for method, operation in item.items():
            assert {"401", "403", "429"} <= set(operation["responses"]), f"{method.upper()} {path}"


async def _endpoint(request: Any) -> Any:
    raise AssertionError("never called")


def test_a_route_added_under_api_without_documentation_stops_the_document(tmp_path: Path, sqlite_url: str) -> None:
    routes = [*build_app(base_settings(tmp_path, sqlite_url)).routes, Route("/api/files/new", _endpoint)]

    with pytest.raises(UndocumentedRoute, match="/api/files/new"):
        openapi_document(routes)


def test_a_documented_route_appears_with_its_operation_and_models() -> None:
    operation = Operation("getThing", "files", "a thing", responses={200: ("the thing", TransferRequest)})

    document = openapi_document([ApiRoute("/api/things/{thing_id:str}", _endpoint, "GET", operation)])

    assert document["paths"]["/api/things/{thing_id}"]["get"]["operationId"] == "getThing"
    assert "TransferRequest" in document["components"]["schemas"]


def test_the_progress_stream_is_declared_as_server_sent_events_with_the_models_of_its_events(
    tmp_path: Path, sqlite_url: str
) -> None:
    document = app_document(tmp_path, sqlite_url)
    operation = document["paths"]["/api/files/upload/session/{session_id}/events"]["get"]

    assert list(operation["responses"]["200"]["content"]) == ["text/event-stream"]
    assert operation["responses"]["404"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
    assert {"ProgressData", "StatusData", "StageData", "FileInfo", "ErrorDetail"} <= set(
        document["components"]["schemas"]
    )


def test_transfer_request_schema_is_the_model_the_handler_validates_with(tmp_path: Path, sqlite_url: str) -> None:
    from tusingest.api.files import parse_transfer_body

    document = app_document(tmp_path, sqlite_url)
    body = document["paths"]["/api/files/{file_id}/transfer"]["post"]["requestBody"]["content"]["application/json"]

    assert body["schema"] == {"$ref": "#/components/schemas/TransferRequest"}
    schema = document["components"]["schemas"]["TransferRequest"]
    expected = TransferRequest.model_json_schema(mode="validation")
    for field in expected["properties"].values():
        field.pop("title")  # the document leaves the property titles out
    assert schema == expected
    assert type(parse_transfer_body(b'{"destination_storage_element_id": "se-2"}')) is TransferRequest
    # What the handler accepts for verify_checksum (null: the server's default) is what the document says.
    assert (
        parse_transfer_body(b'{"destination_storage_element_id": "se-2", "verify_checksum": null}').verify_checksum
        is None
    )
    assert {"type": "null"} in schema["properties"]["verify_checksum"]["anyOf"]
