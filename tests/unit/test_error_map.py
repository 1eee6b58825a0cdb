"""One refusal type per audience, mapped in one place each: the domain's Refused (the finaliser's
FileRejected among them) reaches a tus client as UploadRefused with ArtStore-Error, and an /api
client as the JSON of ApiError, its code carried as an attribute and never read back from a header."""

from __future__ import annotations

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tusingest.api.errors import ApiError, api_exception_handlers
from tusingest.api.finaliser import ERROR_HEADER, refused
from tusingest.finalise.pipeline import FileRejected
from tusingest.finalise.refusals import Refused, TransferInProgress
from tusingest.sessions.locks import LockTimeout
from tusingest.sessions.store import StoreError
from tusingest.tus.body import BodyPace
from tusingest.tus.errors import OffsetMismatch, TusError, UploadRefused


def test_a_finaliser_refusal_without_any_header_keeps_its_code_in_the_facade_json() -> None:
    refusal = UploadRefused(415, "the type text/x-shellscript is not accepted", code="mime_type_not_allowed")

    error = ApiError.from_tus(refusal)

    assert refusal.headers == {}
    assert (error.status, error.body()) == (
        415,
        {"error": "mime_type_not_allowed", "message": "the type text/x-shellscript is not accepted"},
    )


def test_the_finalisers_rejections_and_the_saga_refusals_are_one_type() -> None:
    rejection = FileRejected("virus_detected", "the file contains Eicar-Signature")

    assert isinstance(rejection, Refused) and isinstance(TransferInProgress("f", "t"), Refused)
    assert (rejection.status, rejection.code) == (422, "virus_detected")
    assert ApiError.refused(rejection).body() == {"error": "virus_detected", "message": rejection.message}


def test_the_tus_face_sets_the_artstore_error_header_from_the_refusals_code() -> None:
    tus_error = refused(Refused("checksum does not match", code="checksum_mismatch", status=460))

    assert (tus_error.status, tus_error.code, tus_error.message) == (
        460,
        "checksum_mismatch",
        "checksum does not match",
    )
    assert tus_error.headers == {ERROR_HEADER: "checksum_mismatch"}


def test_every_tus_error_has_a_code_and_a_status_like_tusd() -> None:
    assert (OffsetMismatch.code, OffsetMismatch.status) == ("ERR_MISMATCHED_OFFSET", 409)
    assert all(cls.code for cls in _subclasses(TusError))


def _subclasses(cls: type[TusError]) -> list[type[TusError]]:
    return [cls, *(sub for child in cls.__subclasses__() for sub in _subclasses(child))]


async def test_api_handlers_raise_and_the_exception_handlers_answer() -> None:
    raised: dict[str, Exception] = {
        "refused": TransferInProgress("file-1", "transfer-1"),
        "api": ApiError(409, "offset_mismatch", "the session is at byte 3", bytes_uploaded=3),
        "locked": LockTimeout("busy"),
        "store": StoreError("down"),
        "tus": UploadRefused(503, "storage failed", code="object_refused"),
    }

    async def endpoint(request: Request) -> Response:
        raise raised[request.path_params["kind"]]

    app = Starlette(
        routes=[Route("/api/{kind}", endpoint)], exception_handlers=api_exception_handlers(BodyPace(10.0, 0))
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        answers = {kind: await client.get(f"/api/{kind}") for kind in raised}

    assert {kind: (answer.status_code, answer.json()["error"]) for kind, answer in answers.items()} == {
        "refused": (409, "transfer_in_progress"),
        "api": (409, "offset_mismatch"),
        "locked": (409, "session_busy"),
        "store": (503, "store_unavailable"),
        "tus": (503, "object_refused"),
    }
    assert answers["api"].json()["bytes_uploaded"] == 3
    assert answers["refused"].json()["message"] == "transfer transfer-1 of file file-1 is still running"
