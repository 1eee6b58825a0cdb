"""Writes in bounded pieces (staging/fileio.py): every byte lands in order, and no call exceeds WRITE_PIECE.

The call sizes are observed by wrapping ``os.write`` and ``os.writev`` with spies that pass every call
through to the real system call on a real file; nothing is replaced.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tusingest.staging import fileio
from tusingest.staging.fileio import WRITE_PIECE, write_all, writev_all


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The byte count of every write(2) and writev(2) the module makes."""
    seen: list[int] = []
    real_write, real_writev = os.write, os.writev

    def write(fd: int, data: memoryview) -> int:
        seen.append(len(data))
        return real_write(fd, data)

    def writev(fd: int, buffers: list[memoryview]) -> int:
        seen.append(sum(len(buffer) for buffer in buffers))
        return real_writev(fd, buffers)

    monkeypatch.setattr(fileio.os, "write", write)
    monkeypatch.setattr(fileio.os, "writev", writev)
    return seen


def _write_with(tmp_path: Path, name: str, action) -> bytes:  # type: ignore[no-untyped-def]
    path = tmp_path / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        action(fd)
    finally:
        os.close(fd)
    return path.read_bytes()


def test_write_all_cuts_a_large_buffer_into_pieces(tmp_path: Path, calls: list[int]) -> None:
    data = os.urandom(3 * WRITE_PIECE + 123)
    assert _write_with(tmp_path, "one", lambda fd: write_all(fd, data)) == data
    assert calls == [WRITE_PIECE, WRITE_PIECE, WRITE_PIECE, 123]


def test_writev_all_gathers_small_buffers_and_cuts_large_ones(tmp_path: Path, calls: list[int]) -> None:
    buffers = [os.urandom(WRITE_PIECE // 4) for _ in range(6)] + [os.urandom(2 * WRITE_PIECE + 7), b"", b"x"]
    written = _write_with(tmp_path, "many", lambda fd: writev_all(fd, buffers))
    assert written == b"".join(buffers)
    assert max(calls) == WRITE_PIECE
    assert sum(calls) == len(written)
    assert len(calls) == -(-len(written) // WRITE_PIECE)  # gathered: as few calls as the piece size allows


def test_writev_all_returns_what_it_wrote(tmp_path: Path) -> None:
    buffers = [b"a" * 10, bytearray(b"b" * (WRITE_PIECE + 1)), memoryview(b"c" * 5)]
    total: list[int] = []
    _write_with(tmp_path, "count", lambda fd: total.append(writev_all(fd, buffers)))
    assert total == [10 + WRITE_PIECE + 1 + 5]


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(min_value=0, max_value=WRITE_PIECE + 3), max_size=12))
def test_writev_all_keeps_every_byte_in_order(tmp_path_factory: pytest.TempPathFactory, sizes: list[int]) -> None:
    buffers = [bytes([index % 251]) * size for index, size in enumerate(sizes)]
    directory = tmp_path_factory.mktemp("prop")
    assert _write_with(directory, "prop", lambda fd: writev_all(fd, buffers)) == b"".join(buffers)
