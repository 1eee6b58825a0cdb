"""A real tus client end to end: tuspy uploads, is interrupted, and resumes to identical bytes."""

from __future__ import annotations

import asyncio
import base64
import io
import os

from tusclient.client import TusClient
from tusclient.uploader import Uploader

from tests.fixtures.server import TUS, LiveServer, upload_bytes
from tusingest.sessions import UploadState


async def staged(server: LiveServer, upload_id: str, length: int) -> bytes:
    return await upload_bytes(server, upload_id, length)


async def test_tuspy_uploads_a_file_in_chunks_with_metadata(server: LiveServer) -> None:
    payload = os.urandom((3 << 20) + 17)

    def upload() -> str:
        client = TusClient(server.files_url)
        uploader = Uploader(
            file_stream=io.BytesIO(payload),
            client=client,
            chunk_size=1 << 20,
            metadata={"filename": "scan 01.tiff", "filetype": "image/tiff"},
        )
        uploader.upload()
        return str(uploader.url)

    url = await asyncio.to_thread(upload)
    upload_id = url.rsplit("/", 1)[1]
    record = await server.parts.store.get(upload_id)
    assert record is not None and record.state is UploadState.COMPLETE
    assert await staged(server, upload_id, len(payload)) == payload
    async with server.client() as client:
        head = await client.head(url, headers=TUS)
    pairs = dict(item.split(" ") for item in head.headers["Upload-Metadata"].split(","))
    assert base64.b64decode(pairs["filename"]) == b"scan 01.tiff"


async def test_tuspy_resumes_an_interrupted_upload_from_the_server_offset(server: LiveServer) -> None:
    payload = os.urandom(5 << 20)

    def first_two_chunks() -> str:
        uploader = Uploader(file_stream=io.BytesIO(payload), client=TusClient(server.files_url), chunk_size=1 << 20)
        uploader.upload_chunk()
        uploader.upload_chunk()  # ...and the process dies
        return str(uploader.url)

    url = await asyncio.to_thread(first_two_chunks)

    def resume() -> int:
        uploader = Uploader(
            file_stream=io.BytesIO(payload), client=TusClient(server.files_url), chunk_size=1 << 20, url=url
        )
        resumed_from = int(uploader.get_offset())
        uploader.upload()
        return resumed_from

    resumed_from = await asyncio.to_thread(resume)
    assert resumed_from == 2 << 20
    assert await staged(server, url.rsplit("/", 1)[1], len(payload)) == payload


async def test_tuspy_uploads_with_a_bearer_token_and_the_upload_is_the_tokens_subjects(
    keyed_server: LiveServer,
) -> None:
    from tests.fixtures.jwt import rsa_key, token

    server = keyed_server
    payload = os.urandom((2 << 20) + 5)
    authorization = {"Authorization": f"Bearer {token(rsa_key(), sub='tuspy-user', role='USER')}"}

    def upload() -> str:
        uploader = Uploader(
            file_stream=io.BytesIO(payload),
            client=TusClient(server.files_url, headers=authorization),
            chunk_size=1 << 20,
            metadata={"filename": "scan.bin"},
        )
        uploader.upload()
        return str(uploader.url)

    url = await asyncio.to_thread(upload)
    record = await server.parts.store.get(url.rsplit("/", 1)[1])
    assert record is not None and record.state is UploadState.COMPLETE and record.owner_id == "tuspy-user"
    assert await staged(server, record.id, len(payload)) == payload
    async with server.client() as client:
        assert (await client.head(url, headers=TUS)).status_code == 401  # the same URL without the token
