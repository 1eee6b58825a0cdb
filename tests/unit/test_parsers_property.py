"""Every parser of a header or form field, fed any text: it returns a valid value or raises its
own 4xx error type (BadRequest on tus routes, ApiError or MultipartError on /api), never
anything else. Hypothesis draws the text, weighted towards what broke parsers before: NUL,
digits of other scripts, numbers past every limit, odd whitespace, deep JSON.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.requests import Request

from tusingest.api.errors import ApiError
from tusingest.api.files import MAX_BODY_BYTES, is_file_id, parse_transfer_body
from tusingest.api.jsonbody import JsonRefused, loads_bounded, nesting_depth
from tusingest.api.models import TransferRequest
from tusingest.api.multipart import Field, MultipartError, boundary_of
from tusingest.api.uploads import METADATA_DEPTH, FormOptions, _content_range, _metadata_json
from tusingest.sessions import UploadKind
from tusingest.sessions.model import is_upload_id, new_upload_id
from tusingest.tus.checksum import BodyChecksum, parse_checksum
from tusingest.tus.concat import FinalConcat, parse_upload_concat, same_origin
from tusingest.tus.errors import BadRequest
from tusingest.tus.headers import MAX_INTEGER, non_negative_integer, parse_metadata, parse_non_negative
from tusingest.tus.ietf import parse_sf_boolean, parse_sf_integer, uses_ietf_draft

# No deadline: the machine is shared, and a slow example is not a wrong one.
PROPERTY = settings(deadline=None)

ODD = "\x00\t\n\r \x0b\x0c\u00a0\u2003\u3000\ufeff\u00b2\u00b9\u0661\u0969\uff11\U0001d7ce-+.,;=e_"
odd_text = st.text(alphabet=st.sampled_from(ODD + "0123456789"), max_size=40)
# Past Python's 4,300-digit limit for int(str) and past 64 bits (str(int) of such is refused too).
huge_numbers = st.one_of(
    st.builds(lambda digit, count: digit * count, st.sampled_from("123456789"), st.integers(20, 6000)),
    st.text(alphabet="0123456789", min_size=19, max_size=60),
)
number_like = st.one_of(
    st.integers(min_value=-(10**25), max_value=10**25).map(str),
    huge_numbers,
    st.builds(lambda a, b, c: a + b + c, odd_text, st.integers(min_value=0).map(str), odd_text),
    st.from_regex(r"[0-9]{15,25}", fullmatch=True),
)
any_text = st.one_of(st.text(), odd_text, number_like, st.text(alphabet=st.characters(codec="latin-1")))


def nested(depth: int, opener: str = "[") -> str:
    closer = {"[": "]", "{": "}"}[opener]
    inner = '"a":' if opener == "{" else ""
    return (opener + inner) * depth + "1" + closer * depth


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
json_like = st.one_of(
    json_values.map(json.dumps),
    st.integers(min_value=0, max_value=20_000).flatmap(
        lambda depth: st.sampled_from([nested(depth), nested(depth, "{"), "[" * depth, "{" * depth])
    ),
    any_text,
)


# --- numbers: Upload-Offset, Upload-Length, Content-Length, offset/total_size ----------------


@PROPERTY
@given(any_text)
def test_non_negative_integer_is_a_bounded_ascii_number_or_none(text: str) -> None:
    value = non_negative_integer(text)
    if value is None:
        return
    assert 0 <= value <= MAX_INTEGER
    assert text.isascii() and text.isdigit() and int(text) == value


@PROPERTY
@given(st.integers(min_value=0, max_value=MAX_INTEGER))
def test_non_negative_integer_reads_back_every_64_bit_value(value: int) -> None:
    assert non_negative_integer(str(value)) == value


@PROPERTY
@given(st.sampled_from(["Upload-Offset", "Upload-Length", "Content-Length"]), st.none() | any_text)
def test_tus_number_headers_parse_or_raise_bad_request(name: str, value: str | None) -> None:
    try:
        number = parse_non_negative(name, value, required=False)
    except BadRequest as refused:
        assert name in refused.message and refused.status == 400
        return
    assert number is None if value is None else 0 <= number <= MAX_INTEGER


@PROPERTY
@given(st.sampled_from(["offset", "total_size"]), any_text)
def test_form_numbers_parse_or_raise_api_error_400(name: str, value: str) -> None:
    options = FormOptions()
    try:
        options.take(Field(name, value))
    except ApiError as refused:
        assert (refused.status, refused.code) == (400, "invalid_request")
        return
    number = getattr(options, name)
    assert isinstance(number, int) and 0 <= number <= MAX_INTEGER


content_ranges = st.one_of(
    any_text,
    st.builds(
        lambda a, b, c: f"bytes {a}-{b}/{c}",
        number_like,
        number_like,
        st.one_of(number_like, st.just("*")),
    ),
)


@PROPERTY
@given(st.none() | content_ranges)
def test_content_range_parses_or_raises_api_error_400(value: str | None) -> None:
    try:
        parsed = _content_range(value)
    except ApiError as refused:
        assert (refused.status, refused.code) == (400, "invalid_content_range")
        return
    if value is None:
        assert parsed is None
        return
    assert parsed is not None
    start, total = parsed
    assert 0 <= start <= MAX_INTEGER and (total is None or start < total <= MAX_INTEGER)


@PROPERTY
@given(st.none() | any_text)
def test_structured_field_integer_and_boolean_are_values_or_none(value: str | None) -> None:
    number = parse_sf_integer(value)
    assert number is None or 0 <= number < 10**15
    assert parse_sf_boolean(value) in (None, True, False)


# --- Upload-Metadata, Upload-Checksum, Upload-Concat, Upload-Draft-Interop-Version ------------

metadata_headers = st.one_of(
    any_text,
    st.lists(
        st.tuples(
            st.text(max_size=8),
            st.one_of(st.just(""), st.text(max_size=12), st.binary().map(lambda raw: base64.b64encode(raw).decode())),
        ),
        max_size=5,
    ).map(lambda pairs: ",".join(f"{key} {value}" for key, value in pairs)),
)


@PROPERTY
@given(st.none() | metadata_headers)
def test_upload_metadata_parses_or_raises_bad_request(value: str | None) -> None:
    try:
        parsed = parse_metadata(value)
    except BadRequest:
        return
    for key, item in parsed.items():
        assert key and " " not in key and "," not in key
        assert item is None or isinstance(item, bytes)


checksums = st.one_of(
    any_text,
    st.builds(
        lambda algorithm, digest: f"{algorithm} {digest}",
        st.sampled_from(["md5", "sha1", "sha256", "sha512", "crc32", "SHA256", "sha3", ""]),
        st.one_of(any_text, st.binary(max_size=70).map(lambda raw: base64.b64encode(raw).decode())),
    ),
)


@PROPERTY
@given(checksums)
def test_upload_checksum_parses_or_raises_bad_request(value: str) -> None:
    try:
        parsed = parse_checksum(value)
    except BadRequest:
        return
    assert isinstance(parsed, BodyChecksum)


concat_urls = st.one_of(
    any_text,
    st.builds(lambda id_: "/files/" + id_, st.one_of(any_text, st.just(new_upload_id()))),
    st.builds(
        lambda scheme, host, id_: f"{scheme}://{host}/files/{id_}",
        st.sampled_from(["http", "https", "ftp", "HTTP", ""]),
        st.one_of(st.just("node.example:8020"), any_text),
        st.one_of(any_text, st.just(new_upload_id())),
    ),
)
concat_values = st.one_of(
    any_text,
    st.just("partial"),
    st.lists(concat_urls, max_size=4).map(lambda urls: "final;" + " ".join(urls)),
)


@PROPERTY
@given(concat_values)
def test_upload_concat_parses_or_raises_bad_request(value: str) -> None:
    try:
        parsed = parse_upload_concat(value, "/files/")
    except BadRequest:
        return
    assert parsed is UploadKind.PARTIAL or isinstance(parsed, FinalConcat)
    if isinstance(parsed, FinalConcat):
        assert parsed.parts and all(is_upload_id(part) for part in parsed.parts)


@PROPERTY
@given(concat_urls, st.sampled_from(["http://node.example:8020/files/", "https://uploads.example/files/"]))
def test_same_origin_answers_for_any_url(url: str, location: str) -> None:
    assert same_origin(url, location) in (True, False)


def request_with(headers: dict[str, str]) -> Request:
    raw = [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()]
    return Request({"type": "http", "method": "POST", "path": "/files/", "headers": raw})


@PROPERTY
@given(
    st.text(alphabet=st.characters(codec="latin-1")) | st.sampled_from(["8", " 8\t", "08", "8;x", "7", "\xb8", "\x008"])
)
def test_upload_draft_interop_version_selects_the_draft_only_for_8(value: str) -> None:
    uses = uses_ietf_draft(request_with({"Upload-Draft-Interop-Version": value}))
    assert uses is (value.strip() == "8")


# --- ids -------------------------------------------------------------------------------------


@PROPERTY
@given(any_text)
def test_an_accepted_id_is_short_ascii_without_nul(value: str) -> None:
    if is_upload_id(value):
        assert value.isascii() and "\x00" not in value and 8 <= len(value) <= 64
    if is_file_id(value):
        assert value.isascii() and len(value) == 36


# --- multipart boundary, metadata JSON, transfer body ------------------------------------------


@PROPERTY
@given(
    st.one_of(
        any_text.map(lambda text: "multipart/form-data; boundary=" + text),
        st.integers(min_value=0, max_value=400).map(lambda n: "multipart/form-data; boundary=" + "b" * n),
        any_text,
    )
)
def test_multipart_boundary_is_rfc_2046_or_raises_multipart_error(content_type: str) -> None:
    try:
        boundary = boundary_of(content_type)
    except MultipartError:
        return
    assert 1 <= len(boundary) <= 70


@PROPERTY
@given(json_like)
def test_metadata_json_is_a_flat_string_map_or_raises_api_error_400(value: str) -> None:
    try:
        parsed = _metadata_json(value)
    except ApiError as refused:
        assert (refused.status, refused.code) == (400, "invalid_metadata")
        return
    assert all(isinstance(key, str) and isinstance(item, str) for key, item in parsed.items())


transfer_bodies = st.one_of(
    json_like.map(str.encode),
    st.binary(max_size=200),
    st.fixed_dictionaries(
        {"destination_storage_element_id": st.one_of(st.text(), st.integers(), json_values)},
        optional={"delete_source": json_values, "verify_checksum": json_values, "extra": json_values},
    ).map(lambda body: json.dumps(body).encode()),
    st.just(b'{"destination_storage_element_id": "se-2", "x": "' + b"y" * MAX_BODY_BYTES + b'"}'),
)


@PROPERTY
@given(transfer_bodies)
def test_transfer_body_is_a_transfer_request_or_raises_api_error_400(raw: bytes) -> None:
    try:
        body = parse_transfer_body(raw)
    except ApiError as refused:
        assert (refused.status, refused.code) == (400, "invalid_request")
        return
    assert isinstance(body, TransferRequest) and isinstance(body.destination_storage_element_id, str)


@PROPERTY
@given(json_values)
def test_nesting_depth_of_valid_json_is_exact(value: Any) -> None:
    def depth(item: Any) -> int:
        if isinstance(item, list):
            return 1 + max((depth(child) for child in item), default=0)
        if isinstance(item, dict):
            return 1 + max((depth(child) for child in item.values()), default=0)
        return 0

    assert nesting_depth(json.dumps(value)) == depth(value)


@PROPERTY
@given(st.integers(min_value=0, max_value=50_000))
def test_json_deeper_than_the_bound_is_refused_before_parsing(depth: int) -> None:
    try:
        loads_bounded(nested(depth), max_bytes=1 << 20, max_depth=METADATA_DEPTH)
    except JsonRefused as refused:
        assert depth > METADATA_DEPTH and "deep" in str(refused)
        return
    assert depth <= METADATA_DEPTH
