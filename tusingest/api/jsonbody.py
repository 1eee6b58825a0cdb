"""JSON from clients, bounded: a size and a nesting depth checked before ``json.loads`` runs,
whose recursion would otherwise end a deep document with RecursionError (a 500), not a 400."""

from __future__ import annotations

import json
from typing import Any


class JsonRefused(ValueError):
    """Not JSON, or JSON beyond the size or depth the caller allows; the message says which."""


def loads_bounded(text: str | bytes, *, max_bytes: int, max_depth: int) -> Any:
    if len(text) > max_bytes:
        raise JsonRefused(f"the JSON is larger than {max_bytes} bytes")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise JsonRefused(f"the JSON is not UTF-8: {exc}") from None
    if nesting_depth(text) > max_depth:
        raise JsonRefused(f"the JSON is nested too deep: at most {max_depth} levels of arrays and objects")
    try:
        return json.loads(text)
    except ValueError as exc:  # JSONDecodeError, or a number past int()'s 4,300 digits
        raise JsonRefused(f"not JSON: {exc}") from None


def nesting_depth(text: str) -> int:
    """The deepest nesting of ``[`` and ``{`` outside strings: one pass, no recursion.

    Exact for valid JSON; for anything else an upper bound of what a parser would descend into,
    which is all the check before parsing needs.
    """
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest
