"""A multipart/form-data body as a stream of events, so file parts flow to staging piece by piece
instead of into memory or a temporary file (Starlette's form() spools every file).

python-multipart parses; its callbacks are synchronous, so they only queue events, and the
events of each received chunk are handed out after the chunk is parsed.
"""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator, AsyncIterable
from dataclasses import dataclass

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header

MAX_FIELD_BYTES = 64 << 10  # a form field (metadata JSON, description) is small; a file is a file part
# RFC 2046 5.1.1: 1-70 characters of bchars, the last not a space.
_BOUNDARY = re.compile(rb"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")


class MultipartError(ValueError):
    """The body is not the multipart/form-data it claims to be (or a field is too large)."""


class TruncatedBody(MultipartError):
    """The body ended before its closing boundary: the client stopped sending part way."""


@dataclass(frozen=True, slots=True)
class Field:
    name: str
    value: str


@dataclass(frozen=True, slots=True)
class FileStart:
    name: str
    filename: str
    content_type: str | None


@dataclass(frozen=True, slots=True)
class FileData:
    data: bytes


@dataclass(frozen=True, slots=True)
class FileEnd:
    pass


Event = Field | FileStart | FileData | FileEnd


def boundary_of(content_type: str | None) -> bytes:
    if not content_type:
        raise MultipartError("Content-Type must be multipart/form-data")
    try:
        kind, options = parse_options_header(content_type)
    except ValueError:  # it encodes to latin-1: text a header cannot carry fails there
        raise MultipartError("Content-Type must be multipart/form-data with a boundary") from None
    if kind != b"multipart/form-data" or b"boundary" not in options:
        raise MultipartError("Content-Type must be multipart/form-data with a boundary")
    boundary = options[b"boundary"]
    if _BOUNDARY.fullmatch(boundary) is None:
        raise MultipartError("the multipart boundary must be 1-70 of the characters RFC 2046 allows")
    return boundary


class _Collector:
    def __init__(self) -> None:
        self.events: list[Event] = []
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""
        self._part_type: str | None = None
        self._field: str | None = None  # the name of the field being read, None inside a file
        self._field_value = bytearray()

    def on_part_begin(self) -> None:
        self._disposition = b""
        self._part_type = None
        self._field = None
        self._field_value.clear()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        name = self._header_name.lower()
        if name == b"content-disposition":
            self._disposition = self._header_value
        elif name == b"content-type":
            self._part_type = self._header_value.decode("latin-1").strip()
        self._header_name = b""
        self._header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        if b"name" not in options:
            raise MultipartError('a part has no Content-Disposition "name"')
        name = options[b"name"].decode("utf-8", "replace")
        if b"filename" in options:
            filename = options[b"filename"].decode("utf-8", "replace")
            self.events.append(FileStart(name, filename, self._part_type))
        else:
            self._field = name

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._field is None:
            self.events.append(FileData(data[start:end]))
            return
        if len(self._field_value) + (end - start) > MAX_FIELD_BYTES:
            raise MultipartError(f"form field {self._field!r} is larger than {MAX_FIELD_BYTES} bytes")
        self._field_value += data[start:end]

    def on_part_end(self) -> None:
        if self._field is None:
            self.events.append(FileEnd())
        else:
            self.events.append(Field(self._field, self._field_value.decode("utf-8", "replace")))


async def multipart_events(chunks: AsyncIterable[bytes], boundary: bytes) -> AsyncGenerator[Event]:
    """The form's parts in order: fields whole, files as start, data pieces and end.

    Raises TruncatedBody at the end of a body that stops before its closing boundary, after
    the events of what did arrive (a file part cut short has no FileEnd).
    """
    collector = _Collector()
    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": collector.on_part_begin,
            "on_part_data": collector.on_part_data,
            "on_part_end": collector.on_part_end,
            "on_header_field": collector.on_header_field,
            "on_header_value": collector.on_header_value,
            "on_header_end": collector.on_header_end,
            "on_headers_finished": collector.on_headers_finished,
        },
    )
    try:
        async for chunk in chunks:
            parser.write(chunk)
            events, collector.events = collector.events, []
            for event in events:
                yield event
        parser.finalize()
    except FormParserError as exc:
        raise MultipartError(f"malformed multipart body: {exc}") from None
    for event in collector.events:
        yield event
    if parser.state != MultipartState.END:  # python-multipart's finalize() does not check this
        raise TruncatedBody("the body ended before the closing boundary of the form")
