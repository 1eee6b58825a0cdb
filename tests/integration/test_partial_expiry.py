"""Partial uploads of a concatenation are COMPLETE once their bytes are in, and final uploads read
those bytes in place: the rule for freeing them (sessions/expiry.py ``expire_partials``), on two
nodes that share one PostgreSQL database and one staging directory.

A partial is freed once its TTL has passed, every final that names it is settled and none was used
within the TTL; until then a client may build another final from it.
"""

from __future__ import annotations

import os
from datetime import timedelta
from urllib.parse import urlsplit

import httpx

from tests.fixtures.rawhttp import eventually
from tests.fixtures.server import TUS, LiveServer, ServerFactory
from tests.integration.test_concatenation import create_final, create_partial, upload_id
from tests.integration.test_two_nodes import start_node  # noqa: F401  (the fixture)
from tusingest.app import free_partials
from tusingest.saga.records import SagaState
from tusingest.sessions import UploadState
from tusingest.sessions.model import utcnow

TTL = timedelta(hours=24)  # UPLOAD_SESSION_TTL_HOURS' default, which the nodes run with


async def two_partials(client: httpx.AsyncClient) -> tuple[list[str], bytes]:
    parts = [os.urandom(70_000), os.urandom(30_000)]
    urls = [urlsplit(await create_partial(client, len(part), part)).path for part in parts]
    return urls, b"".join(parts)


async def saga_state(node: LiveServer, final_id: str) -> SagaState | None:
    saga = await node.parts.saga_store.latest_saga("upload", final_id)
    return None if saga is None else saga.state


async def test_partials_are_kept_within_their_ttl_and_freed_after_it_once_the_final_is_stored(
    start_node: ServerFactory,  # noqa: F811
) -> None:
    a = await start_node()
    b = await start_node()
    async with a.client() as client_a, b.client() as client_b:
        urls, whole = await two_partials(client_a)  # partials through node a
        final = await create_final(client_b, urls)  # the final through node b
        again = await create_final(client_b, urls)  # reused within the TTL: still allowed
    final_id, again_id = upload_id(final.headers["Location"]), upload_id(again.headers["Location"])
    for final_upload_id in (final_id, again_id):
        await eventually(
            lambda subject=final_upload_id: saga_state(b, subject), lambda state: state is SagaState.COMPLETED
        )
    part_ids = [upload_id(url) for url in urls]

    kept = await free_partials(a.parts)  # now: within the partials' TTL
    freed = await free_partials(a.parts, now=utcnow() + TTL + timedelta(minutes=1))

    assert (kept, freed) == (0, 2)
    for part_id in part_ids:
        partial = await a.parts.store.get(part_id)
        assert partial is not None and partial.state is UploadState.EXPIRED
        assert await a.parts.staging.last_written(part_id) is None
    async with b.client() as client_b:
        gone = await client_b.head(urls[0], headers=TUS)
        late = await create_final(client_b, urls)
    assert gone.status_code == 410
    assert late.status_code == 400 and "expired" in late.text
    record = await b.parts.saga_store.file_for_upload(final_id)
    assert record is not None and record.size_bytes == len(whole)


async def test_partials_are_kept_past_their_ttl_while_a_final_saga_still_reads_them(
    start_node: ServerFactory,  # noqa: F811
) -> None:
    a = await start_node()
    b = await start_node(saga_failpoints="inspected=pause", finalise_wait_seconds=0)
    async with a.client() as client_a, b.client() as client_b:
        urls, _ = await two_partials(client_a)
        final = await create_final(client_b, urls)
    assert final.status_code == 201

    async def held() -> bool:  # a small file's steps are not in the saga log: ask the failpoint
        return "inspected" in b.parts.sagas.failpoints.reached

    await eventually(held, bool)  # held there: the saga is unsettled

    freed = await free_partials(a.parts, now=utcnow() + 2 * TTL)

    assert freed == 0
    for url in urls:
        partial = await a.parts.store.get(upload_id(url))
        assert partial is not None and partial.state is UploadState.COMPLETE
        assert await a.parts.staging.last_written(upload_id(url)) is not None
