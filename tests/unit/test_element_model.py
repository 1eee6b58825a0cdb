"""The Storage Element model and the one JSON format of the element list."""

from __future__ import annotations

import json

import pytest

from tusingest.elements.model import BackendKind, ElementList, ElementListError, Mode

ISSUE_EXAMPLE = {
    "version": 7,
    "timestamp": "2026-11-28T12:00:00Z",
    "storage_elements": [
        {
            "element_id": "se-01",
            "name": "SE 01",
            "mode": "rw",
            "backend": "s3",
            "endpoint": "http://127.0.0.1:9000",
            "bucket": "artstore-se-01",
            "prefix": "files",
            "region": "us-east-1",
            "capacity_bytes": 1099511627776,
            "used_bytes": 0,
            "priority": 100,
            "datacenter": "dc1",
            "status": "online",
        },
        {
            "element_id": "local",
            "name": "Local",
            "mode": "edit",
            "backend": "directory",
            "path": "/var/lib/artstore/local",
            "capacity_bytes": 10737418240,
            "used_bytes": 0,
            "priority": 50,
            "status": "online",
        },
    ],
}


def test_the_documented_example_parses() -> None:
    elements = ElementList.parse(json.dumps(ISSUE_EXAMPLE))
    assert elements.version == 7
    se01, local = elements.storage_elements
    assert (se01.backend, se01.bucket, se01.prefix, se01.mode) == (BackendKind.S3, "artstore-se-01", "files", Mode.RW)
    assert (local.backend, local.path, local.priority) == (BackendKind.DIRECTORY, "/var/lib/artstore/local", 50)
    assert local.free_bytes == 10737418240


def test_unknown_fields_from_the_admin_module_are_ignored() -> None:
    document = {
        "version": 1,
        "extra": True,
        "storage_elements": [{**ISSUE_EXAMPLE["storage_elements"][1], "api_url": "http://se:8010", "file_count": 12}],
    }  # type: ignore[dict-item]
    (element,) = ElementList.parse(json.dumps(document)).storage_elements
    assert element.element_id == "local"


def test_backend_is_inferred_when_the_admin_module_omits_it() -> None:
    document = {
        "storage_elements": [
            {"element_id": "d", "mode": "rw", "path": "/srv/d"},
            {"element_id": "s", "mode": "rw", "bucket": "b"},
        ]
    }
    d, s = ElementList.parse(json.dumps(document)).storage_elements
    assert (d.backend, s.backend) == (BackendKind.DIRECTORY, BackendKind.S3)


def test_a_bad_element_is_left_out_and_the_others_kept(caplog: pytest.LogCaptureFixture) -> None:
    document = {
        "version": 3,
        "storage_elements": [
            {"element_id": "good", "mode": "rw", "path": "/srv/good"},
            {"element_id": "bad-mode", "mode": "sideways", "path": "/srv/x"},
            {"element_id": "no-bucket", "mode": "rw", "backend": "s3"},
            {"element_id": "../escape", "mode": "rw", "path": "/srv/x"},
            "not an object",
        ],
    }
    elements = ElementList.parse(json.dumps(document))
    assert [e.element_id for e in elements.storage_elements] == ["good"]
    assert "bad-mode" in caplog.text and "no-bucket" in caplog.text


def test_a_duplicated_element_id_keeps_the_first_entry() -> None:
    document = {
        "storage_elements": [
            {"element_id": "a", "mode": "rw", "path": "/one"},
            {"element_id": "a", "mode": "ro", "path": "/two"},
        ]
    }
    (element,) = ElementList.parse(json.dumps(document)).storage_elements
    assert element.path == "/one"


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b"[]",
        b"{}",
        b'{"event": "updated"}',
        b'{"storage_elements": {}}',
        b'{"version": "seven", "storage_elements": []}',
        b"\xff\xfe",
    ],
)
def test_a_malformed_document_is_an_error(raw: bytes) -> None:
    with pytest.raises(ElementListError):
        ElementList.parse(raw)


def test_the_list_round_trips_through_its_json() -> None:
    elements = ElementList.parse(json.dumps(ISSUE_EXAMPLE))
    assert ElementList.parse(elements.to_json()) == elements


@pytest.mark.parametrize(
    ("mode", "uploads", "deletes"),
    [("edit", True, True), ("rw", True, False), ("ro", False, False), ("ar", False, False)],
)
def test_modes_decide_what_is_allowed(mode: str, uploads: bool, deletes: bool) -> None:
    assert (Mode(mode).accepts_uploads, Mode(mode).allows_delete) == (uploads, deletes)


def test_env_name_turns_the_element_id_into_a_variable_name_part() -> None:
    document = {"storage_elements": [{"element_id": "se-01.eu", "mode": "rw", "bucket": "b"}]}
    (element,) = ElementList.parse(json.dumps(document)).storage_elements
    assert element.env_name == "SE_01_EU"
