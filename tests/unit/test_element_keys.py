"""Object keys: relative names that stay inside their element, the same rule on every backend."""

from __future__ import annotations

import pytest

from tusingest.elements.backend import InvalidKey
from tusingest.elements.keys import check_key, check_prefix


@pytest.mark.parametrize(
    "key",
    [
        "a",
        "2026/11/28/12/name_alice_20261128T120000_0f3a.txt",
        ".hidden",
        "a..b/c..",
        "with space/and-dash_underscore",
        "ünïcødé/名前.txt",
        "x" * 1024,
    ],
)
def test_a_relative_key_is_accepted_unchanged(key: str) -> None:
    assert check_key(key) == key


@pytest.mark.parametrize(
    "key",
    [
        "",
        "/absolute",
        "..",
        "a/../b",
        "../escape",
        ".",
        "a/./b",
        "a\\b",
        "a\0b",
        "a//b",
        "a/",
        "x" * 1025,
        "é" * 513,  # 1026 bytes in UTF-8
        "lone\udc80surrogate",
    ],
)
def test_a_key_that_could_leave_or_alias_is_rejected_as_permanent(key: str) -> None:
    with pytest.raises(InvalidKey) as raised:
        check_key(key)
    assert raised.value.transient is False


@pytest.mark.parametrize("prefix", ["", "2026/", "2026/1", "a/b/"])
def test_a_listing_prefix_may_be_empty_or_end_in_a_slash(prefix: str) -> None:
    assert check_prefix(prefix) == prefix


@pytest.mark.parametrize("prefix", ["/", "/a", "../", "a//", "a/../"])
def test_a_listing_prefix_that_leaves_the_element_is_rejected(prefix: str) -> None:
    with pytest.raises(InvalidKey):
        check_prefix(prefix)
