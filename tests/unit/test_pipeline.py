"""The finaliser's one pass without a scanner: hashes, type, limits, declared checksums, compression choice."""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import brotli
import pytest

from tusingest.finalise.pipeline import FileRejected, FinalisePolicy, declared_checksums, inspect
from tusingest.staging import Digests

TEXT = b"".join(f"line {n}: the quick brown fox jumps over the lazy dog\n".encode() for n in range(60_000))


async def blocks(data: bytes, size: int = 100_000) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


async def run(
    data: bytes,
    tmp_path: Path,
    expected: int | None = None,
    *,
    digests: Digests | None = None,
    metadata: dict[str, str] | None = None,
    **policy: object,
) -> object:
    return await inspect(
        blocks(data),
        expected_size=len(data) if expected is None else expected,
        policy=FinalisePolicy(**{"max_size": 1 << 30, "compression_min_size": 1 << 20, **policy}),  # type: ignore[arg-type]
        scanner=None,
        metadata=metadata or {},
        spool_path=tmp_path / "spool",
        digests=digests,
    )


async def test_one_pass_gives_both_hashes_the_size_and_the_type(tmp_path: Path) -> None:
    result = await run(b"%PDF-1.7\n" + os.urandom(5000), tmp_path)
    assert result.content_type == "application/pdf"  # type: ignore[attr-defined]
    assert result.size == 5009  # type: ignore[attr-defined]


async def test_a_large_text_is_compressed_into_the_spool_and_round_trips(tmp_path: Path) -> None:
    result = await run(TEXT, tmp_path)
    compression = result.compression  # type: ignore[attr-defined]
    assert compression is not None and compression.algorithm == "br"
    stored = (tmp_path / "spool").read_bytes()
    assert len(stored) == compression.stored_size < len(TEXT) // 4
    assert brotli.decompress(stored) == TEXT
    assert result.sha256 == hashlib.sha256(TEXT).hexdigest()  # type: ignore[attr-defined]


async def test_both_hashes_of_many_blocks_come_out_in_order(tmp_path: Path) -> None:
    data = os.urandom(3_000_017)  # 31 blocks, MD5 and SHA-256 on two threads
    result = await run(data, tmp_path)
    assert result.md5 == hashlib.md5(data).hexdigest()  # type: ignore[attr-defined]
    assert result.sha256 == hashlib.sha256(data).hexdigest()  # type: ignore[attr-defined]


async def test_digests_taken_as_the_bytes_were_committed_are_used_not_taken_again(tmp_path: Path) -> None:
    """Made-up digests stand in for staging's running ones: the pass reports them, so it did not hash;
    it still compresses, counts and checks the declared ones against them."""
    known = Digests(len(TEXT), "0" * 32, "1" * 64)
    result = await run(TEXT, tmp_path, digests=known)
    assert (result.md5, result.sha256) == (known.md5, known.sha256)  # type: ignore[attr-defined]
    assert brotli.decompress((tmp_path / "spool").read_bytes()) == TEXT
    with pytest.raises(FileRejected) as refused:
        await run(TEXT, tmp_path, digests=known, metadata={"sha256": hashlib.sha256(TEXT).hexdigest()})
    assert refused.value.code == "checksum_mismatch"


async def test_digests_of_another_length_are_ignored_and_the_bytes_hashed(tmp_path: Path) -> None:
    result = await run(TEXT, tmp_path, digests=Digests(len(TEXT) - 1, "0" * 32, "1" * 64))
    assert result.sha256 == hashlib.sha256(TEXT).hexdigest()  # type: ignore[attr-defined]


async def test_text_below_the_minimum_size_is_not_compressed(tmp_path: Path) -> None:
    result = await run(TEXT[:100_000], tmp_path)
    assert result.compression is None  # type: ignore[attr-defined]
    assert not (tmp_path / "spool").exists()


async def test_compression_off_leaves_everything_raw(tmp_path: Path) -> None:
    result = await run(TEXT, tmp_path, compression_enabled=False)
    assert result.compression is None  # type: ignore[attr-defined]


async def test_a_file_over_the_limit_is_refused_before_reading(tmp_path: Path) -> None:
    with pytest.raises(FileRejected) as refused:
        await run(b"x" * 100, tmp_path, max_size=99)
    assert refused.value.code == "file_too_large"


async def test_fewer_bytes_than_declared_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FileRejected) as refused:
        await run(b"x" * 100, tmp_path, expected=101)
    assert refused.value.code == "size_mismatch"


async def test_a_refused_type_is_a_415(tmp_path: Path) -> None:
    with pytest.raises(FileRejected) as refused:
        await run(TEXT, tmp_path, allowed_mime_types=("image/*",))
    assert (refused.value.code, refused.value.status) == ("mime_type_not_allowed", 415)
    assert not (tmp_path / "spool").exists()


def test_declared_checksums_accept_hex_and_base64() -> None:
    digest = hashlib.sha256(b"abc").digest()
    assert declared_checksums({"sha256": digest.hex().upper()}) == {"sha256": digest.hex()}
    assert declared_checksums({"sha256": base64.b64encode(digest).decode()}) == {"sha256": digest.hex()}
    md5 = hashlib.md5(b"abc").digest()
    assert declared_checksums({"checksum_md5": base64.b64encode(md5).decode()}) == {"md5": md5.hex()}
    assert declared_checksums({"filename": "a"}) == {}


@pytest.mark.parametrize("value", ["xyz", "00" * 31, base64.b64encode(b"short").decode()])
def test_a_malformed_declared_checksum_is_refused(value: str) -> None:
    with pytest.raises(FileRejected) as refused:
        declared_checksums({"sha256": value})
    assert refused.value.code == "invalid_checksum"
