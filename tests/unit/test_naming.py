"""Stored names, object keys and attr.json as ArtStore lays them out."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest

from tusingest.finalise.naming import (
    MAX_NAME_COMPONENT_BYTES,
    MAX_SIDECAR_BYTES,
    MAX_STORED_NAME,
    MAX_STORED_NAME_BYTES,
    SIDECAR_SUFFIX,
    cut,
    sanitise_filename,
    sidecar_document,
    sidecar_key,
    sidecar_worst_case_size,
    storage_key,
    stored_name,
)

WHEN = datetime(2026, 11, 28, 9, 5, 7, tzinfo=UTC)
FILE_ID = "0b0f8a52-3c1e-4f6e-9f3a-1d2c3b4a5e6f"


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("report.pdf", "report.pdf"),
        ("../../etc/passwd", "passwd"),
        ("C:\\Users\\me\\scan.tiff", "scan.tiff"),
        ("bad\x00name\x1f.txt", "badname.txt"),
        ("  lots   of   space  .csv", "lots of space .csv"),
        (".hidden", "hidden"),
        ("Résumé \u2013 東京.docx", "Résumé \u2013 東京.docx"),
        ('a:b*c?"d<e>f|g.txt', "a_b_c__d_e_f_g.txt"),
        ("\u202egnp.exe", "gnp.exe"),  # a right-to-left override cannot disguise the extension
        ("", "file"),
        ("////", "file"),
    ],
)
def test_filenames_are_sanitised_and_unicode_is_kept(raw: str, clean: str) -> None:
    assert sanitise_filename(raw) == clean


def test_stored_name_follows_the_artstore_pattern() -> None:
    name = stored_name("Quarterly Report.pdf", "alice", WHEN, FILE_ID)
    assert name == f"Quarterly_Report_alice_20261128T090507_{FILE_ID}.pdf"


def test_stored_name_uses_utc_whatever_the_zone_of_the_timestamp() -> None:
    local = WHEN.astimezone(timezone(timedelta(hours=5)))
    assert stored_name("a.txt", "bob", local, FILE_ID) == stored_name("a.txt", "bob", WHEN, FILE_ID)


def test_a_long_name_is_cut_to_200_characters_keeping_id_timestamp_and_extension() -> None:
    name = stored_name("x" * 500 + ".tar.gz", "u" * 300, WHEN, FILE_ID)
    assert len(name) <= MAX_STORED_NAME
    assert name.endswith(f"_20261128T090507_{FILE_ID}.gz")
    assert name.startswith("x")


def test_a_name_without_extension_gets_none() -> None:
    assert stored_name("README", "alice", WHEN, FILE_ID) == f"README_alice_20261128T090507_{FILE_ID}"


def test_the_key_puts_the_name_under_its_hour() -> None:
    key = storage_key("n.txt", WHEN)
    assert key == "2026/11/28/09/n.txt"
    assert sidecar_key(key) == "2026/11/28/09/n.txt.attr.json"


def sidecar(**overrides: object) -> dict[str, object]:
    values: dict[str, object] = {
        "file_id": FILE_ID,
        "original_filename": "Quarterly Report.pdf",
        "storage_filename": "Quarterly_Report_alice.pdf",
        "storage_path": "2026/11/28/09/Quarterly_Report_alice.pdf",
        "file_size": 12345,
        "content_type": "application/pdf",
        "created_at": WHEN,
        "created_by_id": "u-1",
        "created_by_username": "alice",
        "md5": "0" * 32,
        "sha256": "1" * 64,
        "compression": {"algorithm": "brotli", "original_size": 12345, "stored_size": 4000},
        "metadata": {"project": "atlas"},
    }
    values.update(overrides)
    return json.loads(sidecar_document(**values))  # type: ignore[arg-type]


def test_attr_json_holds_every_field_of_the_schema() -> None:
    document = sidecar()
    assert document["schema_version"] == 1
    assert document["created_at"] == "2026-11-28T09:05:07Z"
    assert document["created_by"] == {"id": "u-1", "username": "alice"}
    assert document["compression"]["stored_size"] == 4000
    assert set(document) == {
        "schema_version", "file_id", "original_filename", "storage_filename", "storage_path", "file_size",
        "content_type", "created_at", "created_by", "md5", "sha256", "compression", "metadata",
    }  # fmt: skip


def test_attr_json_stays_within_4_kib_by_dropping_the_largest_metadata_first() -> None:
    metadata = {"small": "keep me", "huge": "y" * 5000, "big": "z" * 2000}
    raw = sidecar_document(**{**sidecar_args(), "metadata": metadata})  # type: ignore[arg-type]
    document = json.loads(raw)
    assert len(raw) <= MAX_SIDECAR_BYTES
    assert document["metadata"]["small"] == "keep me" and "huge" not in document["metadata"]
    assert document["metadata"]["_truncated"] == "true"


def sidecar_args() -> dict[str, object]:
    return {
        "file_id": FILE_ID,
        "original_filename": "a.txt",
        "storage_filename": "a.txt",
        "storage_path": "2026/11/28/09/a.txt",
        "file_size": 1,
        "content_type": "text/plain",
        "created_at": WHEN,
        "created_by_id": None,
        "created_by_username": "anonymous",
        "md5": "0" * 32,
        "sha256": "1" * 64,
        "compression": None,
        "metadata": {},
    }


# --- names bounded in bytes, hostile names --------------------------------------------------------


@pytest.mark.parametrize(
    "original",
    [
        "東" * 70 + ".txt",
        "Ж" * 100 + ".pdf",
        "😀" * 80 + ".png",
        "a" * 300 + ".txt",
        "東" * 300 + ".文档文档",  # a multi-byte extension is kept too
    ],
)
@pytest.mark.parametrize("username", ["alice", "ü" * 64, "東" * 64])
def test_a_stored_name_fits_200_characters_and_its_sidecar_name_fits_255_bytes(original: str, username: str) -> None:
    name = stored_name(original, username, WHEN, FILE_ID)
    assert len(name) <= MAX_STORED_NAME
    assert len(name.encode()) <= MAX_STORED_NAME_BYTES
    assert len((name + SIDECAR_SUFFIX).encode()) <= MAX_NAME_COMPONENT_BYTES
    assert name.endswith(f"_20261128T090507_{FILE_ID}.{original.rpartition('.')[2]}")
    assert name.startswith(original[0])
    assert len(sidecar_key(storage_key(name, WHEN)).encode()) <= 1024


def test_when_both_are_long_the_username_keeps_half_the_room_and_the_stem_the_rest() -> None:
    name = stored_name("東" * 200 + ".txt", "ж" * 64, WHEN, FILE_ID)
    stem, user = name.split("_")[:2]
    room = MAX_STORED_NAME_BYTES - len(f"___20261128T090507{FILE_ID}.txt")  # 187 bytes
    assert user == "ж" * (room // 2 // 2)  # 2-byte characters within half the room
    assert stem == "東" * ((room - len(user.encode())) // 3)
    assert len(name.encode()) > MAX_STORED_NAME_BYTES - 3  # less than one character is wasted


def test_a_short_stem_leaves_its_room_to_a_long_username() -> None:
    name = stored_name("a.txt", "u" * 300, WHEN, FILE_ID)
    assert name.startswith("a_uuu") and len(name) == MAX_STORED_NAME


@pytest.mark.parametrize(
    ("text", "chars", "size", "expected"),
    [
        ("東京都", 10, 7, "東京"),  # 7 bytes would split the third character: it goes whole
        ("東京都", 10, 9, "東京都"),
        ("東京都", 2, 100, "東京"),
        ("😀x", 5, 3, ""),
        ("abc", 0, 10, ""),
    ],
)
def test_cutting_ends_on_a_character_boundary(text: str, chars: int, size: int, expected: str) -> None:
    assert cut(text, chars, size) == expected


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("CON", "_CON"),
        ("nul.txt", "_nul.txt"),
        ("Com1.tar.gz", "_Com1.tar.gz"),
        ("LPT9", "_LPT9"),
        ("console.txt", "console.txt"),  # only the device names themselves are reserved
        ("..", "file"),
        ("../x", "x"),
        ("...", "file"),
        ("line\r\nbreak.txt", "linebreak.txt"),
        ("c1\x85control\x9f.txt", "c1control.txt"),
        ("trailing dots...", "trailing dots"),
        (".pdf", "pdf"),
        ("a\ud800b.txt", "ab.txt"),  # a lone surrogate cannot be encoded: removed
    ],
)
def test_reserved_and_relative_names_are_made_safe(raw: str, clean: str) -> None:
    assert sanitise_filename(raw) == clean


def test_the_original_filename_stays_as_sent_in_attr_json() -> None:
    original = 'line\r\n"quoted"\\../CON\x01.txt'
    assert sidecar(original_filename=original)["original_filename"] == original


def test_the_worst_case_sidecar_bounds_every_real_one() -> None:
    metadata = {"filename": "Отчёт.pdf", "username": "ü" * 64, "user_id": "i" * 128, "note": "\x01" * 100}
    worst = sidecar_worst_case_size(
        original_filename="Отчёт.pdf", username="ü" * 64, user_id="i" * 128, metadata=metadata
    )
    name = stored_name("Отчёт.pdf", "ü" * 64, WHEN, FILE_ID)
    real = sidecar_document(
        **{  # type: ignore[arg-type]
            **sidecar_args(),
            "original_filename": "Отчёт.pdf",
            "storage_filename": name,
            "storage_path": storage_key(name, WHEN),
            "file_size": 5 << 30,
            "content_type": "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
            "created_at": WHEN.replace(microsecond=123456),
            "created_by_id": "i" * 128,
            "created_by_username": "ü" * 64,
            "compression": {"algorithm": "brotli", "original_size": 5 << 30, "stored_size": 1 << 30},
            "metadata": metadata,
        }
    )
    assert len(real) <= worst <= MAX_SIDECAR_BYTES
    assert json.loads(real)["metadata"] == metadata  # nothing was trimmed
