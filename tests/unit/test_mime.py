"""MIME detection from a file's first bytes (libmagic) and the allow-list check, on files built here."""

from __future__ import annotations

import io
import json
import random
import struct
import subprocess
import sys
import threading
import zipfile
import zlib

import pytest

from tusingest.finalise.mime import HEAD_BYTES, detect_mime, essence, mime_allowed, mime_matches

CONTENT_TYPES = (
    b'<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
    b'<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
    b'<Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
    b'<Default Extension="xml" ContentType="application/xml"/></Types>'
)
RELS = (
    b'<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
    b'<Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships"/>'
)


def png() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    pixels = b"".join(b"\0" + b"\xff\x00\x00" * 4 for _ in range(4))
    header = struct.pack(">IIBBBBB", 4, 4, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(pixels)) + chunk(b"IEND", b"")


def jpeg() -> bytes:
    return b"\xff\xd8\xff\xe0" + struct.pack(">H", 16) + b"JFIF\0\x01\x01\0\0\x01\0\x01\0\0" + b"\xff\xd9"


def pdf() -> bytes:
    return b"%PDF-1.7\n1 0 obj\n<< /Type /Catalog >>\nendobj\ntrailer\n<< /Root 1 0 R >>\n%%EOF\n"


def zip_of(entries: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in entries:
            # ODF requires its "mimetype" entry stored; media is stored as Office does; the rest is deflated.
            method = zipfile.ZIP_STORED if name == "mimetype" or name.startswith("media/") else zipfile.ZIP_DEFLATED
            archive.writestr(name, data, compress_type=method)
    return buffer.getvalue()


def ooxml(part: str, padding: int = 0) -> bytes:
    """An Office Open XML package laid out as Office writes it; ``padding`` bytes of incompressible
    media at the end push its length past HEAD_BYTES."""
    entries = [("[Content_Types].xml", CONTENT_TYPES), ("_rels/.rels", RELS), (part, b"<document/>")]
    if padding:
        entries.append(("media/image1.png", random.Random(0).randbytes(padding)))
    return zip_of(entries)


def odf(mimetype: str) -> bytes:
    return zip_of([("mimetype", mimetype.encode()), ("content.xml", b"<office:document-content/>")])


DOCX = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
XLSX = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
PPTX = "application/vnd.openxmlformats-officedocument.presentationml.presentation"
ODT = "application/vnd.oasis.opendocument.text"
ODS = "application/vnd.oasis.opendocument.spreadsheet"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (png(), "image/png"),
        (jpeg(), "image/jpeg"),
        (pdf(), "application/pdf"),
        (b"Dear collector,\nthe painting arrived safely.\n", "text/plain"),
        (json.dumps({"file_id": "abc", "tags": ["oil", "canvas"], "size": 12}).encode(), "application/json"),
        (ooxml("word/document.xml"), DOCX),
        (ooxml("xl/workbook.xml"), XLSX),
        (ooxml("ppt/presentation.xml"), PPTX),
        (odf(ODT), ODT),
        (odf(ODS), ODS),
        (zip_of([("notes.txt", b"plain archive")]), "application/zip"),
    ],
    ids=["png", "jpeg", "pdf", "text", "json", "docx", "xlsx", "pptx", "odt", "ods", "zip"],
)
def test_detect_mime_names_the_type_from_the_first_bytes(content: bytes, expected: str) -> None:
    assert detect_mime(content[:HEAD_BYTES]) == expected


@pytest.mark.parametrize(("part", "expected"), [("word/document.xml", DOCX), ("xl/workbook.xml", XLSX)])
def test_head_bytes_of_a_large_office_file_are_enough_to_tell_it_from_a_zip(part: str, expected: str) -> None:
    document = ooxml(part, padding=4 * HEAD_BYTES)
    assert len(document) > 4 * HEAD_BYTES

    assert detect_mime(document[:HEAD_BYTES]) == expected


def test_detect_mime_is_safe_to_call_from_many_threads() -> None:
    samples = [(png(), "image/png"), (pdf(), "application/pdf"), (ooxml("word/document.xml"), DOCX)] * 30
    wrong: list[str] = []

    def detect(content: bytes, expected: str) -> None:
        if (found := detect_mime(content)) != expected:
            wrong.append(found)

    threads = [threading.Thread(target=detect, args=sample) for sample in samples]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert wrong == []


@pytest.mark.parametrize(
    ("mime", "expected"),
    [("text/plain", "text/plain"), ("Text/Plain; charset=UTF-8", "text/plain"), (" IMAGE/PNG ", "image/png")],
)
def test_essence_drops_parameters_and_case(mime: str, expected: str) -> None:
    assert essence(mime) == expected


@pytest.mark.parametrize(
    ("mime", "allowed", "expected"),
    [
        ("image/png", ["image/png"], True),
        ("image/jpeg", ["image/png"], False),
        ("image/jpeg", ["image/*"], True),
        ("image/svg+xml", ["image/*"], True),
        ("imagex/png", ["image/*"], False),
        ("text/plain", ["image/*", "application/pdf"], False),
        ("application/pdf", ["image/*", "application/pdf"], True),
        ("application/zip", ["*/*"], True),
        ("application/zip", [], True),
        ("application/zip", ["", " "], True),
        ("IMAGE/PNG", ["image/png"], True),
        ("image/png", ["Image/PNG"], True),
        ("text/plain; charset=utf-8", ["text/plain"], True),
        ("text/plain", ["text/plain; charset=utf-8"], True),
        ("text/csv", ["text/plain"], False),
        (DOCX, ["application/vnd.openxmlformats-officedocument.*"], True),
        ("application/ld+json", ["application/*+json"], True),
    ],
)
def test_mime_allowed_matches_exact_types_wildcards_and_everything(
    mime: str, allowed: list[str], expected: bool
) -> None:
    assert mime_allowed(mime, allowed) is expected


def test_mime_matches_one_pattern_like_mime_allowed_does_for_a_list() -> None:
    assert mime_matches("Application/PDF; version=1.7", "application/pdf")
    assert not mime_matches("application/pdf", "application/pd")


def test_importing_the_module_does_not_open_libmagic() -> None:
    # A fresh interpreter: this one has used detect_mime already.
    probe = "import tusingest.finalise.mime as m; print(m._handle is None)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)

    assert result.stdout.strip() == "True"
