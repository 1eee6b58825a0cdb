"""The upload command's inputs: sizes, metadata pairs, and which files of a folder it sends."""

from __future__ import annotations

from pathlib import Path

import pytest

from tusingest.client.command import collect, parse_metadata, parse_size


@pytest.mark.parametrize(
    ("text", "size"),
    [("1048576", 1 << 20), ("8MiB", 8 << 20), ("512k", 512 << 10), ("2MB", 2_000_000), ("1g", 1 << 30)],
)
def test_parse_size_reads_bytes_and_binary_and_decimal_units(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["0", "-1", "8 parsecs", "MiB", "", "1.5MiB"])
def test_parse_size_refuses_what_is_not_a_positive_size(text: str) -> None:
    with pytest.raises(ValueError, match="is not a size"):
        parse_size(text)


def test_parse_metadata_keeps_equals_signs_in_values_and_refuses_keys_with_spaces() -> None:
    assert parse_metadata(["project=bridge", "note=a=b", "empty="]) == {"project": "bridge", "note": "a=b", "empty": ""}
    with pytest.raises(ValueError, match="key=value"):
        parse_metadata(["bad key=x"])
    with pytest.raises(ValueError, match="key=value"):
        parse_metadata(["novalue"])


def test_collect_walks_folders_with_include_and_exclude_and_sends_named_files_once(tmp_path: Path) -> None:
    for name in ["a.tif", "b.jpg", "raw/c.tif", "raw/tmp/d.tif", "notes.txt"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")

    found = list(collect([tmp_path, tmp_path / "a.tif", tmp_path / "notes.txt"], ["*.tif"], ["raw/tmp/*"]))

    # notes.txt is named on the command line: globs choose only among the files of folders
    assert found == [tmp_path / "a.tif", tmp_path / "raw" / "c.tif", tmp_path / "notes.txt"]
