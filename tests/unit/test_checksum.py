"""Upload-Checksum parsing and the body hasher of the checksum extension."""

from __future__ import annotations

import base64
import hashlib
import zlib

import pytest

from tusingest.tus.checksum import ALGORITHMS, parse_checksum
from tusingest.tus.errors import BadRequest

BODY = b"the quick brown fox jumps over the lazy dog" * 1000


def digest(algorithm: str, data: bytes) -> bytes:
    if algorithm == "crc32":
        return zlib.crc32(data).to_bytes(4, "big")
    return hashlib.new(algorithm, data).digest()


def header(algorithm: str, data: bytes) -> str:
    return f"{algorithm} {base64.b64encode(digest(algorithm, data)).decode()}"


def test_algorithms_are_advertised_in_a_fixed_order() -> None:
    assert ALGORITHMS == ("md5", "sha1", "sha256", "sha512", "crc32")


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_a_body_hashed_in_pieces_matches_its_digest(algorithm: str) -> None:
    checksum = parse_checksum(header(algorithm, BODY))
    for start in range(0, len(BODY), 4096):
        checksum.update(BODY[start : start + 4096])
    assert checksum.algorithm == algorithm
    assert checksum.matches()


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_a_different_body_does_not_match(algorithm: str) -> None:
    checksum = parse_checksum(header(algorithm, BODY))
    checksum.update(BODY[:-1] + b"!")
    assert not checksum.matches()


def test_an_empty_body_matches_the_digest_of_nothing() -> None:
    assert parse_checksum(header("sha1", b"")).matches()


def test_crc32_digest_is_four_bytes_big_endian() -> None:
    value = zlib.crc32(b"123456789")  # the CRC-32 check value 0xCBF43926
    checksum = parse_checksum("crc32 " + base64.b64encode(bytes.fromhex("cbf43926")).decode())
    checksum.update(b"123456789")
    assert value == 0xCBF43926
    assert checksum.matches()


def test_surrounding_whitespace_is_ignored() -> None:
    assert parse_checksum("  " + header("md5", b"") + " ").matches()


@pytest.mark.parametrize("algorithm", ["sha3", "SHA1", "blake2b", "crc32c", "adler32"])
def test_an_unknown_algorithm_is_a_bad_request_naming_the_supported_ones(algorithm: str) -> None:
    with pytest.raises(BadRequest, match=r"unsupported Upload-Checksum algorithm.*md5,sha1,sha256,sha512,crc32"):
        parse_checksum(f"{algorithm} AAAAAA==")


@pytest.mark.parametrize(
    "value",
    [
        "",
        "   ",
        "sha1",
        "sha1 ",
        " 2jmj7l5rSw0yVb/vlWAYkK/YBwk=",
        "sha1  2jmj7l5rSw0yVb/vlWAYkK/YBwk=",  # two spaces
        "sha1 2jmj7l5rSw0yVb/vlWAYkK/YBwk= extra",
        "sha1\t2jmj7l5rSw0yVb/vlWAYkK/YBwk=",
    ],
)
def test_a_malformed_header_is_a_bad_request(value: str) -> None:
    with pytest.raises(BadRequest, match="invalid Upload-Checksum"):
        parse_checksum(value)


@pytest.mark.parametrize(
    "value",
    [
        "sha1 2jmj7l5rSw0yVb/vlWAYkK/YBwk",  # padding missing
        "sha1 2jmj7l5rSw0yVb_vlWAYkK_YBwk=",  # url-safe alphabet
        "sha1 not*base64!",
    ],
)
def test_a_digest_that_is_not_strict_base64_is_a_bad_request(value: str) -> None:
    with pytest.raises(BadRequest, match="not base64"):
        parse_checksum(value)


@pytest.mark.parametrize(
    ("algorithm", "size"),
    [("md5", 20), ("sha1", 16), ("sha256", 20), ("sha512", 32), ("crc32", 8), ("crc32", 0)],
)
def test_a_digest_of_the_wrong_length_is_a_bad_request(algorithm: str, size: int) -> None:
    encoded = base64.b64encode(b"\x01" * size).decode()
    with pytest.raises(BadRequest):
        parse_checksum(f"{algorithm} {encoded}")
