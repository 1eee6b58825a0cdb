"""Removing an upload's staging folder while a file appears in it (a compression follower opening its spool as
the upload is terminated) leaves no folder behind. The file is made at the exact moment by a wrapper around the
real ``os.rmdir`` (a timing seam: shutil's last step, after it has removed what it listed), which then runs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tusingest.staging import DirectoryStaging


async def test_a_file_made_while_the_folder_is_removed_does_not_keep_the_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    staging = DirectoryStaging(tmp_path)
    try:
        async with await staging.open_writer("u", 0) as writer:
            await writer.write(b"x" * 1000)
            await writer.sync()
        folder = tmp_path / "u"
        made: list[Path] = []
        real_rmdir = os.rmdir

        def rmdir(path: str | Path, *, dir_fd: int | None = None) -> None:
            if not made and os.fspath(path) == str(folder):
                late = folder / "follow-late"
                late.write_bytes(b"spool")  # as if opened just now, after rmtree listed the folder
                made.append(late)
            real_rmdir(path, dir_fd=dir_fd)

        monkeypatch.setattr(os, "rmdir", rmdir)
        await staging.remove("u")
    finally:
        staging.close()
    assert made, "the seam never ran: shutil.rmtree no longer ends with os.rmdir of the folder"
    assert not folder.exists()
    assert await staging.last_written("u") is None
