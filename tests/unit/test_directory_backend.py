"""The directory backend's own layout, beyond the shared contract: where attributes are kept (and what
happens without xattrs), which files are never objects, and the directories it tidies up."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tusingest.elements import directory as directory_module
from tusingest.elements.backend import BackendError, InvalidKey, ObjectRefused
from tusingest.elements.directory import DirectoryBackend, directory_error, is_temp_name


async def stream(*chunks: bytes) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


def staged_file(directory: Path, name: str, data: bytes) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_bytes(data)
    return path


@pytest.fixture
def backend(tmp_path: Path) -> DirectoryBackend:
    return DirectoryBackend("dir-1", tmp_path / "root")


async def test_put_creates_the_root_and_parents_and_keeps_attributes_in_user_xattrs(backend: DirectoryBackend) -> None:
    await backend.put("a/b/c.txt", stream(b"hello"), content_type="text/plain", metadata={"Owner": "alice"})
    path = backend.root / "a" / "b" / "c.txt"
    assert path.read_bytes() == b"hello"
    assert os.getxattr(path, "user.artstore.content_type") == b"text/plain"
    assert json.loads(os.getxattr(path, "user.artstore.meta")) == {"owner": "alice"}
    with pytest.raises(OSError) as absent:
        os.getxattr(path, "user.artstore.content_encoding")
    assert absent.value.errno == errno.ENODATA


async def test_without_xattr_support_put_stores_the_bytes_and_head_reports_no_attributes(
    backend: DirectoryBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unsupported(*args: object) -> bytes:
        raise OSError(errno.ENOTSUP, "Operation not supported")

    monkeypatch.setattr(os, "setxattr", unsupported)
    monkeypatch.setattr(os, "getxattr", unsupported)
    await backend.put("k", stream(b"data"), content_type="text/plain", content_encoding="gzip", metadata={"a": "b"})
    head = await backend.head("k")
    assert head is not None
    assert (head.size, head.content_type, head.content_encoding, dict(head.metadata)) == (4, None, None, {})


async def test_list_keys_skips_temp_files_and_a_temp_file_name_is_not_a_valid_key(backend: DirectoryBackend) -> None:
    await backend.put("dir/real.bin", stream(b"x"))
    stray = backend.root / "dir" / ".real.bin.0123456789abcdef.tmp"
    stray.write_bytes(b"half")
    assert is_temp_name(stray.name)
    assert [key async for key in backend.list_keys()] == ["dir/real.bin"]
    with pytest.raises(InvalidKey):
        await backend.put("dir/.real.bin.0123456789abcdef.tmp", stream(b"x"))


async def test_delete_removes_emptied_parent_directories_but_not_the_root_or_a_busy_one(
    backend: DirectoryBackend,
) -> None:
    await backend.put("2026/11/28/a.bin", stream(b"a"))
    await backend.put("2026/12/b.bin", stream(b"b"))
    assert await backend.delete("2026/11/28/a.bin") is True
    assert sorted(str(path.relative_to(backend.root)) for path in backend.root.rglob("*")) == [
        "2026",
        "2026/12",
        "2026/12/b.bin",
    ]
    assert await backend.delete("2026/12/b.bin") is True
    assert backend.root.is_dir() and list(backend.root.iterdir()) == []


async def test_a_key_naming_a_directory_of_other_keys_is_not_an_object(backend: DirectoryBackend) -> None:
    await backend.put("a/b.bin", stream(b"x"))
    assert await backend.head("a") is None
    assert await backend.delete("a") is False
    assert (backend.root / "a" / "b.bin").exists()


async def test_probe_creates_a_missing_root_and_leaves_nothing_in_it(backend: DirectoryBackend) -> None:
    await backend.probe()
    assert backend.root.is_dir() and list(backend.root.iterdir()) == []


@pytest.fixture
def other_filesystem() -> Iterator[Path]:
    # /dev/shm is a tmpfs on every Linux we run on, so it is another filesystem than tmp_path.
    with tempfile.TemporaryDirectory(dir="/dev/shm") as directory:
        yield Path(directory)


async def test_can_copy_to_is_true_on_one_filesystem_and_false_across_filesystems(
    backend: DirectoryBackend, tmp_path: Path, other_filesystem: Path
) -> None:
    assert os.stat(tmp_path).st_dev != os.stat(other_filesystem).st_dev, "the test needs two filesystems"
    assert backend.can_copy_to(DirectoryBackend("dir-2", tmp_path / "not-yet-created")) is True
    assert backend.can_copy_to(DirectoryBackend("dir-3", other_filesystem / "element")) is False


@pytest.mark.parametrize(
    ("code", "transient"),
    [
        (errno.ENOSPC, True),
        (errno.EIO, True),
        (errno.ESTALE, True),
        (errno.EACCES, False),
        (errno.EROFS, False),
        (errno.ENOTDIR, False),
        (errno.EEXIST, False),
    ],
    ids=errno.errorcode.get,
)
def test_file_errors_are_transient_only_when_a_later_attempt_may_succeed(code: int, transient: bool) -> None:
    error = directory_error(OSError(code, os.strerror(code), "/data/x"), element_id="dir-1", operation="put", key="x")
    assert type(error) is BackendError
    assert error.transient is transient
    assert str(error).startswith("element dir-1: put of 'x' failed: ")


async def test_a_name_component_over_255_bytes_is_refused_as_the_request_s_fault(backend: DirectoryBackend) -> None:
    name = "東" * 86  # 258 bytes
    with pytest.raises(ObjectRefused) as refused:
        await backend.put(f"2026/11/28/09/{name}", stream(b"x"), length=1)
    assert refused.value.transient is False and refused.value.key.endswith(name)
    assert list(backend.root.rglob("*.tmp")) == []  # the temp file went with the failed put


async def test_a_name_of_255_bytes_of_multibyte_characters_is_stored(backend: DirectoryBackend) -> None:
    # The temp file's name is cut in bytes: a 255-byte name does not make it too long.
    name = "東" * 85  # 255 bytes
    info = await backend.put(f"a/{name}", stream(b"bytes"), length=5)
    assert info.size == 5 and (backend.root / "a" / name).read_bytes() == b"bytes"


@pytest.mark.parametrize("code", [errno.ENAMETOOLONG, errno.EILSEQ, errno.EINVAL])
def test_name_errors_of_a_file_operation_become_object_refused(code: int) -> None:
    error = directory_error(OSError(code, os.strerror(code), "/root/a/name"), element_id="d", operation="put", key="a")
    assert isinstance(error, ObjectRefused)


def test_a_full_disk_is_still_an_element_failure() -> None:
    exc = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/root/a/name")
    error = directory_error(exc, element_id="d", operation="put", key="a")
    assert type(error) is BackendError and error.transient is True


@pytest.mark.parametrize("how", ["put", "place_file"])
async def test_an_object_that_need_not_be_durable_leaves_its_directory_fsync_to_the_next_durable_put_there(
    backend: DirectoryBackend, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, how: str
) -> None:
    # A power cut cannot be staged here; what is checked is which directory fsyncs are issued (the
    # real fsyncs still run), and that the object's bytes and name are in place before the sidecar.
    synced: list[Path] = []
    real = directory_module._fsync_directory

    def recording(directory: Path) -> None:
        synced.append(directory)
        real(directory)

    monkeypatch.setattr(directory_module, "_fsync_directory", recording)
    if how == "put":
        await backend.put("2026/12/02/16/f.bin", stream(b"object"), durable=False)
    else:
        source = staged_file(tmp_path / "staging", "0.chunk", b"object")
        await backend.place_file("2026/12/02/16/f.bin", [(source, 6)], length=6, durable=False)
    after_object = list(synced)
    await backend.put("2026/12/02/16/f.bin.attr.json", stream(b"{}"))

    folder = backend.root / "2026" / "12" / "02" / "16"
    assert after_object == []
    assert synced == [folder]
    assert (folder / "f.bin").read_bytes() == b"object"


async def test_a_one_batch_put_and_a_place_with_nothing_to_await_take_one_thread_call_each(
    backend: DirectoryBackend, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls: list[str] = []
    real = directory_module.asyncio.to_thread

    async def counting(function: Any, /, *args: Any, **kwargs: Any) -> Any:
        calls.append(getattr(function, "__name__", repr(function)))
        return await real(function, *args, **kwargs)

    monkeypatch.setattr(directory_module.asyncio, "to_thread", counting)
    await backend.put("a/f.bin.attr.json", stream(b"{", b"}"))
    on_put = list(calls)
    source = staged_file(tmp_path / "staging", "0.chunk", b"object")
    await backend.place_file("a/f.bin", [(source, 6)], length=6)

    assert on_put == ["commit"]
    assert calls == ["commit", "fill_and_commit"]
    assert (backend.root / "a" / "f.bin.attr.json").read_bytes() == b"{}"
    assert (backend.root / "a" / "f.bin").read_bytes() == b"object"
    assert sorted(p.name for p in (backend.root / "a").iterdir()) == ["f.bin", "f.bin.attr.json"]


# --- place_file: the staged file becomes the object without passing through the process -----------


async def test_place_file_links_one_whole_file_on_the_same_filesystem(
    backend: DirectoryBackend, tmp_path: Path
) -> None:
    source = staged_file(tmp_path / "staging", "0.chunk", b"the staged bytes")
    info = await backend.place_file("a/b.bin", [(source, 16)], length=16, metadata={"File-Id": "f1"})
    placed = backend.root / "a" / "b.bin"
    assert placed.stat().st_ino == source.stat().st_ino and source.stat().st_nlink == 2
    assert placed.read_bytes() == b"the staged bytes" and source.read_bytes() == b"the staged bytes"
    assert info.size == 16 and (await backend.head("a/b.bin")) == info
    assert [p.name for p in placed.parent.iterdir()] == ["b.bin"]  # no temp file left


@pytest.mark.parametrize("kernel_copy", [True, False], ids=["copy_file_range", "through memory"])
async def test_place_file_copies_several_files_and_only_their_given_lengths(
    backend: DirectoryBackend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kernel_copy: bool
) -> None:
    if not kernel_copy:

        def unsupported(*args: object) -> int:
            raise OSError(errno.EXDEV, "Invalid cross-device link")

        monkeypatch.setattr(os, "copy_file_range", unsupported)
    first = staged_file(tmp_path / "staging", "0.chunk", b"A" * 3000)
    second = staged_file(tmp_path / "staging", "1.chunk", b"B" * 5000 + b"garbage past the committed offset")
    await backend.place_file("k", [(first, 3000), (second, 5000)], length=8000)
    placed = backend.root / "k"
    assert placed.read_bytes() == b"A" * 3000 + b"B" * 5000
    assert placed.stat().st_nlink == 1 and first.stat().st_nlink == 1


async def test_place_file_copies_across_filesystems(tmp_path: Path, other_filesystem: Path) -> None:
    backend = DirectoryBackend("dir-shm", other_filesystem / "element")
    source = staged_file(tmp_path / "staging", "0.chunk", os.urandom(100_000))
    await backend.place_file("k", [(source, 100_000)], length=100_000)
    placed = backend.root / "k"
    assert placed.read_bytes() == source.read_bytes() and placed.stat().st_nlink == 1


async def test_place_file_refuses_a_length_the_files_do_not_add_up_to_and_leaves_nothing(
    backend: DirectoryBackend, tmp_path: Path
) -> None:
    source = staged_file(tmp_path / "staging", "0.chunk", b"12345")
    with pytest.raises(BackendError) as refused:
        await backend.place_file("k", [(source, 5)], length=6)
    assert refused.value.transient is False
    assert not backend.root.exists() or not any(backend.root.rglob("*"))


_KILLED_PLACE = """
import asyncio, os, sys, time
from pathlib import Path
from tusingest.elements.directory import DirectoryBackend

async def main() -> None:
    root, source, marker = sys.argv[1:4]
    async def stop_here() -> None:
        Path(marker).write_text("linked")
        await asyncio.Event().wait()  # killed here, between the link and the rename
    await DirectoryBackend("dir-1", root).place_file("a/k", [(Path(source), 6)], length=6, before_commit=stop_here)

asyncio.run(main())
"""


async def test_a_place_killed_between_link_and_rename_leaves_nothing_once_the_key_is_placed_again(
    backend: DirectoryBackend, tmp_path: Path
) -> None:
    import asyncio
    import subprocess
    import sys

    from tests.fixtures.rawhttp import eventually

    source = staged_file(tmp_path / "staging", "0.chunk", b"staged")
    marker = tmp_path / "linked"
    child = subprocess.Popen([sys.executable, "-c", _KILLED_PLACE, str(backend.root), str(source), str(marker)])
    try:
        await eventually(lambda: asyncio.to_thread(marker.exists), bool, timeout=30)
    finally:
        child.kill()
        child.wait(10)
    (left,) = (backend.root / "a").iterdir()
    assert is_temp_name(left.name) and source.stat().st_nlink == 2  # the kill left its temp link
    assert [key async for key in backend.list_keys()] == []

    # What the saga does when it puts the key again after a takeover or restart.
    assert await backend.discard_incomplete("a/k") == 1
    await backend.place_file("a/k", [(source, 6)], length=6)
    assert [p.name for p in (backend.root / "a").iterdir()] == ["k"]
    assert (backend.root / "a" / "k").read_bytes() == b"staged" and source.stat().st_nlink == 2
