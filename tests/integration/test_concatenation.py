"""The concatenation and concatenation-unfinished extensions against a live server: partial
uploads, final uploads over them (complete at once, or once their last partial completes),
every 400/403/413 rule, and the final's bytes read back through ``read_upload``.

Every test runs against both session stores (SQLite and PostgreSQL).
"""

from __future__ import annotations

import asyncio
import random
from urllib.parse import urlsplit

import httpx
import pytest

from tests.fixtures.server import OCTETS, TUS, LiveServer, ServerFactory, upload_bytes
from tusingest.sessions import Upload, UploadKind, UploadState
from tusingest.staging import StagingError


async def create_partial(client: httpx.AsyncClient, length: int | None, body: bytes | None = None) -> str:
    headers = TUS | {"Upload-Concat": "partial"}
    headers |= {"Upload-Length": str(length)} if length is not None else {"Upload-Defer-Length": "1"}
    if body is not None:
        headers["Content-Type"] = OCTETS
    response = await client.post("/files/", headers=headers, content=body)
    assert response.status_code == 201, response.text
    return response.headers["Location"]


async def create_final(client: httpx.AsyncClient, urls: list[str], **headers: str) -> httpx.Response:
    return await client.post("/files/", headers=TUS | {"Upload-Concat": "final;" + " ".join(urls)} | headers)


async def patch(client: httpx.AsyncClient, url: str, offset: int, body: bytes) -> httpx.Response:
    return await client.patch(url, headers=TUS | {"Upload-Offset": str(offset), "Content-Type": OCTETS}, content=body)


async def head(client: httpx.AsyncClient, url: str) -> httpx.Response:
    return await client.head(url, headers=TUS)


def upload_id(url: str) -> str:
    return url.rsplit("/", 1)[1]


def path_of(url: str) -> str:
    return urlsplit(url).path


def record_completions(server: LiveServer) -> list[Upload]:
    """Every upload handed to the completion hook from now on, in order."""
    hooks = server.parts.tus.ctx.hooks
    completed = hooks.completed
    calls: list[Upload] = []

    async def recording(upload: Upload) -> None:
        calls.append(upload)
        await completed(upload)

    hooks.completed = recording  # type: ignore[method-assign]
    return calls


async def read_back(server: LiveServer, url: str) -> bytes:
    return await upload_bytes(server, upload_id(url))


# --- partial uploads -----------------------------------------------------------------------------


async def test_partial_upload_is_created_and_head_echoes_upload_concat_partial(server: LiveServer) -> None:
    async with server.client() as client:
        url = await create_partial(client, 10)
        response = await head(client, url)
    assert response.status_code == 200
    assert response.headers["Upload-Concat"] == "partial"
    assert response.headers["Upload-Offset"] == "0"
    assert response.headers["Upload-Length"] == "10"
    stored = await server.parts.store.get(upload_id(url))
    assert stored is not None and stored.kind is UploadKind.PARTIAL


async def test_partial_upload_with_creation_with_upload_is_complete_without_the_completion_hook(
    server: LiveServer,
) -> None:
    calls = record_completions(server)
    async with server.client() as client:
        url = await create_partial(client, 5, b"hello")
        response = await head(client, url)
    assert response.headers["Upload-Offset"] == "5"
    stored = await server.parts.store.get(upload_id(url))
    assert stored is not None and stored.state is UploadState.COMPLETE
    assert calls == []
    assert await read_back(server, url) == b"hello"


async def test_partial_upload_with_deferred_length_takes_its_length_from_a_patch(server: LiveServer) -> None:
    async with server.client() as client:
        url = await create_partial(client, None)
        before = await head(client, url)
        response = await client.patch(
            url, headers=TUS | {"Upload-Offset": "0", "Content-Type": OCTETS, "Upload-Length": "3"}, content=b"abc"
        )
        after = await head(client, url)
    assert before.headers["Upload-Defer-Length"] == "1"
    assert response.status_code == 204
    assert after.headers["Upload-Length"] == "3" and after.headers["Upload-Offset"] == "3"
    assert after.headers["Upload-Concat"] == "partial"


async def test_a_partial_upload_never_reaches_the_completion_hook(server: LiveServer) -> None:
    calls = record_completions(server)
    async with server.client() as client:
        url = await create_partial(client, 4)
        response = await patch(client, url, 0, b"data")
    assert response.status_code == 204
    assert calls == []
    stored = await server.parts.store.get(upload_id(url))
    assert stored is not None and stored.state is UploadState.COMPLETE


# --- final uploads over complete partials ------------------------------------------------------


async def test_final_over_complete_partials_is_complete_at_once_with_the_sum_as_length(server: LiveServer) -> None:
    calls = record_completions(server)
    async with server.client() as client:
        a = await create_partial(client, 3, b"abc")
        b = await create_partial(client, 4, b"defg")
        response = await create_final(client, [a, b])
        assert response.status_code == 201, response.text
        final = response.headers["Location"]
        reported = await head(client, final)
    assert final.startswith(server.files_url)
    assert reported.headers["Upload-Length"] == "7"
    assert reported.headers["Upload-Offset"] == "7"
    assert reported.headers["Upload-Concat"] == f"final;{a} {b}"
    assert [u.id for u in calls] == [upload_id(final)]
    stored = await server.parts.store.get(upload_id(final))
    assert stored is not None
    assert stored.kind is UploadKind.FINAL and stored.parts == (upload_id(a), upload_id(b))
    assert stored.state is UploadState.COMPLETE


async def test_final_over_three_partials_one_repeated_reads_back_exactly(server: LiveServer) -> None:
    bodies = [b"first-", b"second partial-", b"3rd"]
    async with server.client() as client:
        urls = [await create_partial(client, len(body), body) for body in bodies]
        order = [urls[0], urls[1], urls[0], urls[2]]
        response = await create_final(client, order)
        assert response.status_code == 201, response.text
        final = response.headers["Location"]
        reported = await head(client, final)
    expected = bodies[0] + bodies[1] + bodies[0] + bodies[2]
    assert reported.headers["Upload-Length"] == str(len(expected))
    assert await read_back(server, final) == expected


async def test_final_does_not_copy_bytes_it_refers_to_the_partials_staging(server: LiveServer) -> None:
    async with server.client() as client:
        a = await create_partial(client, 2, b"ab")
        response = await create_final(client, [a, a])
    final = response.headers["Location"]
    assert await server.parts.staging.list_upload_ids() == [upload_id(a)]
    assert await read_back(server, final) == b"abab"


async def test_final_accepts_absolute_urls_and_paths_alike(server: LiveServer) -> None:
    async with server.client() as client:
        a = await create_partial(client, 1, b"x")
        b = await create_partial(client, 1, b"y")
        response = await create_final(client, [a, path_of(b)])
        assert response.status_code == 201, response.text
        reported = await head(client, response.headers["Location"])
    assert reported.headers["Upload-Concat"] == f"final;{a} {b}"  # canonical: absolute, like Location
    assert await read_back(server, response.headers["Location"]) == b"xy"


async def test_final_keeps_its_metadata(server: LiveServer) -> None:
    async with server.client() as client:
        a = await create_partial(client, 1, b"x")
        response = await create_final(client, [a], **{"Upload-Metadata": "filename c2Nhbi50aWZm"})
        reported = await head(client, response.headers["Location"])
    assert reported.headers["Upload-Metadata"] == "filename c2Nhbi50aWZm"


async def test_patch_on_a_final_upload_is_403(server: LiveServer) -> None:
    async with server.client() as client:
        a = await create_partial(client, 2)
        final = (await create_final(client, [a])).headers["Location"]
        response = await patch(client, final, 0, b"ab")
        reported = await head(client, final)
    assert response.status_code == 403
    assert "Upload-Offset" not in reported.headers


# --- concatenation-unfinished ------------------------------------------------------------------


async def test_head_on_an_unfinished_final_omits_upload_offset_but_gives_the_length(server: LiveServer) -> None:
    async with server.client() as client:
        a = await create_partial(client, 3, b"abc")
        b = await create_partial(client, 4)
        response = await create_final(client, [a, b])
        assert response.status_code == 201, response.text
        reported = await head(client, response.headers["Location"])
    assert "Upload-Offset" not in reported.headers
    assert reported.headers["Upload-Length"] == "7"
    assert reported.headers["Upload-Concat"] == f"final;{a} {b}"
    assert "Upload-Expires" in response.headers and "Upload-Expires" in reported.headers


async def test_unfinished_final_completes_exactly_once_when_its_partials_finish_in_any_order(
    server: LiveServer,
) -> None:
    calls = record_completions(server)
    bodies = [bytes([65 + i]) * (100 + 37 * i) for i in range(4)]
    async with server.client() as client:
        urls = [await create_partial(client, len(body)) for body in bodies]
        for url, body in zip(urls, bodies, strict=True):
            assert (await patch(client, url, 0, body[:50])).status_code == 204
        order = [urls[2], urls[0], urls[3], urls[2], urls[1]]
        response = await create_final(client, order)
        assert response.status_code == 201, response.text
        final = response.headers["Location"]

        finishing = random.sample(range(4), 4)
        results = await asyncio.gather(*(patch(client, urls[i], 50, bodies[i][50:]) for i in finishing))
        reported = await head(client, final)
    assert [r.status_code for r in results] == [204] * 4, finishing
    expected = b"".join(bodies[urls.index(url)] for url in order)
    assert reported.headers["Upload-Offset"] == reported.headers["Upload-Length"] == str(len(expected))
    assert [u.id for u in calls] == [upload_id(final)], f"finishing order {finishing}"
    assert await read_back(server, final) == expected


async def test_a_final_created_before_its_partials_is_completed_by_the_last_partials_patch(
    server: LiveServer,
) -> None:
    calls = record_completions(server)
    async with server.client() as client:
        a = await create_partial(client, 2)
        b = await create_partial(client, 2)
        final = (await create_final(client, [a, b])).headers["Location"]
        await patch(client, a, 0, b"ab")
        assert calls == []
        await patch(client, b, 0, b"cd")
    assert [u.id for u in calls] == [upload_id(final)]
    stored = await server.parts.store.get(upload_id(final))
    assert stored is not None and stored.state is UploadState.COMPLETE and stored.offset == 4
    for partial in (a, b):
        part = await server.parts.store.get(upload_id(partial))
        assert part is not None and part.state is UploadState.COMPLETE


async def test_two_finals_sharing_a_partial_both_complete_once(server: LiveServer) -> None:
    calls = record_completions(server)
    async with server.client() as client:
        shared = await create_partial(client, 3)
        other = await create_partial(client, 1, b"!")
        one = (await create_final(client, [shared])).headers["Location"]
        two = (await create_final(client, [other, shared])).headers["Location"]
        await patch(client, shared, 0, b"abc")
    assert sorted(u.id for u in calls) == sorted([upload_id(one), upload_id(two)])
    assert await read_back(server, two) == b"!abc"


async def test_a_final_whose_completion_was_missed_is_completed_by_head(start_server: ServerFactory) -> None:
    server = await start_server(lock_timeout_seconds=0.3)
    calls = record_completions(server)
    async with server.client() as client:
        a = await create_partial(client, 2)
        final = (await create_final(client, [a])).headers["Location"]
        async with server.parts.locker.lock(upload_id(final)):  # the final is busy: the PATCH cannot complete it
            response = await patch(client, a, 0, b"ab")
        assert calls == []
        reported = await head(client, final)
    assert response.status_code == 204
    assert reported.headers["Upload-Offset"] == "2"
    assert [u.id for u in calls] == [upload_id(final)]


async def test_read_upload_refuses_a_final_whose_partials_are_not_complete(server: LiveServer) -> None:
    async with server.client() as client:
        a = await create_partial(client, 2, b"a")
        final = (await create_final(client, [a])).headers["Location"]
    with pytest.raises(StagingError, match="not complete"):
        await read_back(server, final)


# --- what is refused -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    ["", "partial;", "Partial", "final", "final;", "finale;/files/abc", "partial final;/files/abc"],
)
async def test_malformed_upload_concat_is_400(server: LiveServer, value: str) -> None:
    async with server.client() as client:
        response = await client.post("/files/", headers=TUS | {"Upload-Concat": value, "Upload-Length": "1"})
    assert response.status_code == 400
    assert "Upload-Concat" in response.text


@pytest.mark.parametrize(
    "url", ["/other/0123", "/files/", "/files/a/b", "ftp://host/files/abc", "/files/abc?x=1", "files/abc"]
)
async def test_final_with_a_url_that_is_not_an_upload_of_this_server_is_400(server: LiveServer, url: str) -> None:
    async with server.client() as client:
        response = await create_final(client, [url])
    assert response.status_code == 400
    assert "not an upload URL" in response.text


async def test_final_with_an_unknown_upload_is_400(server: LiveServer) -> None:
    async with server.client() as client:
        a = await create_partial(client, 1, b"x")
        response = await create_final(client, [a, "/files/" + "0" * 32])
    assert response.status_code == 400
    assert "not a known upload" in response.text


async def test_final_over_an_upload_that_is_not_partial_is_400(server: LiveServer) -> None:
    async with server.client() as client:
        single = (await client.post("/files/", headers=TUS | {"Upload-Length": "0"})).headers["Location"]
        response = await create_final(client, [single])
    assert response.status_code == 400
    assert "not a partial upload" in response.text


async def test_final_over_a_terminated_partial_is_400(server: LiveServer) -> None:
    async with server.client() as client:
        a = await create_partial(client, 1, b"x")
        assert (await client.delete(a, headers=TUS)).status_code == 204
        response = await create_final(client, [a])
    assert response.status_code == 400
    assert "terminated or has expired" in response.text


async def test_final_over_an_expired_partial_is_400(server: LiveServer) -> None:
    async with server.client() as client:
        a = await create_partial(client, 2)
        await server.parts.store.set_state(upload_id(a), UploadState.EXPIRED)
        response = await create_final(client, [a])
    assert response.status_code == 400
    assert "terminated or has expired" in response.text


async def test_final_over_a_partial_with_deferred_length_is_400(server: LiveServer) -> None:
    async with server.client() as client:
        a = await create_partial(client, None)
        response = await create_final(client, [a])
    assert response.status_code == 400
    assert "no Upload-Length" in response.text


@pytest.mark.parametrize("headers", [{"Upload-Length": "1"}, {"Upload-Defer-Length": "1"}])
async def test_final_with_a_length_of_its_own_is_400(server: LiveServer, headers: dict[str, str]) -> None:
    async with server.client() as client:
        a = await create_partial(client, 1, b"x")
        response = await create_final(client, [a], **headers)
    assert response.status_code == 400
    assert "Upload-Length" in response.text


async def test_final_with_a_body_is_400(server: LiveServer) -> None:
    async with server.client() as client:
        a = await create_partial(client, 1, b"x")
        response = await client.post(
            "/files/",
            headers=TUS | {"Upload-Concat": f"final;{a}", "Content-Type": OCTETS},
            content=b"extra",
        )
    assert response.status_code == 400
    assert "no body" in response.text


async def test_final_whose_partials_add_up_past_tus_max_size_is_413(start_server: ServerFactory) -> None:
    server = await start_server(max_file_size_mb=1)
    async with server.client() as client:
        a = await create_partial(client, 600 << 10)
        b = await create_partial(client, 500 << 10)
        response = await create_final(client, [a, b])
        ok = await create_final(client, [a])
    assert response.status_code == 413
    assert ok.status_code == 201


async def test_upload_concat_when_concatenation_is_disabled_is_400(start_server: ServerFactory) -> None:
    server = await start_server(tus_extensions="creation,creation-with-upload")
    async with server.client() as client:
        response = await client.post("/files/", headers=TUS | {"Upload-Concat": "partial", "Upload-Length": "1"})
        options = await client.options("/files/")
    assert response.status_code == 400
    assert "concatenation is not enabled" in response.text
    assert "concatenation" not in options.headers["Tus-Extension"]


async def test_without_concatenation_unfinished_a_final_needs_complete_partials(start_server: ServerFactory) -> None:
    server = await start_server(tus_extensions="creation,creation-with-upload,concatenation")
    async with server.client() as client:
        done = await create_partial(client, 1, b"x")
        pending = await create_partial(client, 1)
        refused = await create_final(client, [done, pending])
        accepted = await create_final(client, [done])
        options = await client.options("/files/")
    assert refused.status_code == 400
    assert "must be complete" in refused.text
    assert accepted.status_code == 201
    assert options.headers["Tus-Extension"].split(",")[-1] == "concatenation"


async def test_cors_exposes_upload_concat(server: LiveServer) -> None:
    async with server.client() as client:
        url = await create_partial(client, 1)
        response = await client.head(url, headers=TUS | {"Origin": "https://app.example"})
    exposed = {h.strip().lower() for h in response.headers["Access-Control-Expose-Headers"].split(",")}
    assert "upload-concat" in exposed
