"""The card's on/off switches do what they say: RESUMABLE_UPLOADS_ENABLED=false leaves only whole-file
uploads (no tus endpoint, no X-Upload-Session-ID on the facade). Store-independent: SQLite only."""

from __future__ import annotations

import os
import uuid
from datetime import UTC, datetime

import pytest

from tests.fixtures.server import TUS, LiveServer, ServerFactory
from tests.integration.test_facade_upload import post_file

FAR_FUTURE = datetime(9999, 1, 1, tzinfo=UTC)
pytestmark = pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)


async def test_with_resumable_uploads_off_the_tus_endpoint_answers_404_saying_why(start_server: ServerFactory) -> None:
    server: LiveServer = await start_server(resumable_uploads_enabled=False)
    async with server.client() as client:
        options = await client.options("/files/")
        created = await client.post("/files/", headers=TUS | {"Upload-Length": "10"})
        head = await client.head("/files/" + uuid.uuid4().hex, headers=TUS)
    for response in (options, created, head):
        assert response.status_code == 404
        assert "Tus-Version" not in response.headers and "Location" not in response.headers
    assert "RESUMABLE_UPLOADS_ENABLED=false" in created.text
    assert await server.parts.store.list_expired(now=FAR_FUTURE) == []  # no upload was created


async def test_with_resumable_uploads_off_the_facade_refuses_a_session_and_keeps_whole_files(
    start_server: ServerFactory,
) -> None:
    server: LiveServer = await start_server(resumable_uploads_enabled=False)
    payload = os.urandom(20_000)
    async with server.client() as client:
        refused = await post_file(client, payload, headers={"X-Upload-Session-ID": str(uuid.uuid4())})
        whole = await post_file(client, payload)
    assert refused.status_code == 400
    assert refused.json()["error"] == "resumable_uploads_disabled"
    assert "X-Upload-Session-ID" in refused.json()["message"]
    assert whole.status_code == 201 and whole.json()["size_bytes"] == len(payload)
