"""What the ASGI server (Hypercorn) lets us say on the wire, pinned down so a change shows:

- No 104 (Upload Resumption Supported) interim response: Hypercorn drops informational responses
  on HTTP/1.1 (h11) and on HTTP/2 sends only 103 Early Hints; ASGI has no message for a 104.
  A client learns the upload URL from the 201 (docs/tus.md, "104 Upload Resumption Supported").
- No request trailers reach the app on either path, so ``checksum-trailer`` is not offered: a
  checksum sent as a trailer is not seen (the bytes are kept as without one).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import socket
from urllib.parse import urlsplit

import h2.config
import h2.connection
import h2.events

from tests.fixtures.rawhttp import open_request, read_response
from tests.fixtures.server import OCTETS, TUS, LiveServer

DRAFT = {"Upload-Draft-Interop-Version": "8"}


async def test_draft_creation_over_http1_gets_no_104_only_100_continue_then_the_201(sqlite_server: LiveServer) -> None:
    body = os.urandom(1000)
    headers = DRAFT | {"Upload-Complete": "?1", "Content-Length": str(len(body)), "Expect": "100-continue"}
    reader, writer = await open_request(sqlite_server.files_url, "POST", headers)
    try:
        # Nothing of the body is sent yet: a 104 would come now, before the 100 that asks for it.
        interim, _ = await asyncio.wait_for(read_response(reader), 10)
        writer.write(body)
        await writer.drain()
        final, final_headers = await asyncio.wait_for(read_response(reader), 10)
    finally:
        writer.close()
    assert interim == 100
    assert final == 201
    assert final_headers["location"].startswith(sqlite_server.files_url)


def _h2_exchange(url: str, headers: list[tuple[str, str]], body: bytes) -> list[h2.events.Event]:
    """One request over cleartext HTTP/2 (prior knowledge); every event up to the stream's end."""
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    events: list[h2.events.Event] = []
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        connection.initiate_connection()
        request = [(":method", "POST"), (":path", parts.path), (":scheme", "http"), (":authority", parts.netloc)]
        connection.send_headers(1, request + headers)
        sock.sendall(connection.data_to_send())
        connection.send_data(1, body, end_stream=True)
        sock.sendall(connection.data_to_send())
        while not any(isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)) for event in events):
            data = sock.recv(65536)
            assert data, "the server closed the connection"
            events += connection.receive_data(data)
            sock.sendall(connection.data_to_send())
    return events


async def test_draft_creation_over_http2_gets_no_interim_response_only_the_201(sqlite_server: LiveServer) -> None:
    headers = [(name.lower(), value) for name, value in (DRAFT | {"upload-complete": "?1"}).items()]
    events = await asyncio.to_thread(_h2_exchange, sqlite_server.files_url, headers, os.urandom(1000))
    assert not [event for event in events if isinstance(event, h2.events.InformationalResponseReceived)]
    [response] = [event for event in events if isinstance(event, h2.events.ResponseReceived)]
    answer = dict((bytes(name).decode(), bytes(value).decode()) for name, value in response.headers)
    assert answer[":status"] == "201"
    assert answer["location"].startswith(sqlite_server.files_url)


async def test_a_checksum_sent_as_a_request_trailer_does_not_reach_the_server(sqlite_server: LiveServer) -> None:
    body = os.urandom(1000)
    wrong = base64.b64encode(hashlib.sha1(b"not the body").digest()).decode()
    async with sqlite_server.client() as client:
        options = await client.options("/files/", headers=TUS)
        created = await client.post("/files/", headers=TUS | {"Upload-Length": str(len(body))})
    assert "checksum" in options.headers["Tus-Extension"].split(",")
    assert "checksum-trailer" not in options.headers["Tus-Extension"].split(",")
    headers = TUS | {
        "Upload-Offset": "0",
        "Content-Type": OCTETS,
        "Transfer-Encoding": "chunked",
        "Trailer": "Upload-Checksum",
    }
    reader, writer = await open_request(created.headers["Location"], "PATCH", headers)
    try:
        writer.write(b"%x\r\n%s\r\n0\r\nUpload-Checksum: sha1 %s\r\n\r\n" % (len(body), body, wrong.encode()))
        await writer.drain()
        status, answer = await asyncio.wait_for(read_response(reader), 10)
    finally:
        writer.close()
    # A checksum the server saw would make this 460 and keep nothing.
    assert status == 204
    assert answer["upload-offset"] == str(len(body))
