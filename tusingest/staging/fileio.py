"""Writes to files in calls of a bounded size.

Linux 6.x gives each ``write(2)`` a page-cache folio sized by the call, up to 2 MiB. On a VM
whose balloon reports free pages to its host (virtio-balloon free page reporting, as on
Firecracker), free blocks go back to the host unbacked, and the first touch of each page costs a
host fault; the larger the folio, the likelier it comes from such a block. Measured here
(docs/benchmarks.md, "Writes in pieces", ``benchmarks/write_sizes.py``): 512 MiB written after a
few seconds idle took 2.2-2.4 s of kernel time in 4 MiB calls, 1.2-1.6 s in 512 KiB calls,
0.5-0.75 s in 256 KiB calls and 0.18-0.24 s in 64 KiB calls, the size @tus/server writes in.
Elsewhere the smaller calls cost a few microseconds each, so every large write of staging and the
element goes through here.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

WRITE_PIECE = 64 << 10  # bytes per write(2)
IOV_MAX = 512  # iovecs per writev(2), well under the kernel's IOV_MAX (1024)

Buffer = bytes | bytearray | memoryview


def write_all(fd: int, data: Buffer) -> None:
    """Write all of ``data`` at the file position, in calls of at most ``WRITE_PIECE`` bytes."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view[:WRITE_PIECE]) :]


def writev_all(fd: int, buffers: Iterable[Buffer]) -> int:
    """Write the buffers in order, gathered into ``writev`` calls of at most ``WRITE_PIECE`` bytes
    (small buffers share a call, large ones are cut). Returns the bytes written: all of them."""
    group: list[memoryview] = []
    size = total = 0
    for buffer in buffers:
        view = memoryview(buffer)
        while view:
            take = view[: WRITE_PIECE - size]
            view = view[len(take) :]
            group.append(take)
            size += len(take)
            if size == WRITE_PIECE or len(group) == IOV_MAX:
                _writev(fd, group, size)
                total += size
                group, size = [], 0
    if group:
        _writev(fd, group, size)
        total += size
    return total


def _writev(fd: int, group: list[memoryview], size: int) -> None:
    done = os.writev(fd, group)
    if done != size:  # short writes are rare (disk full signals as OSError); finish the rest
        write_all(fd, memoryview(b"".join(group))[done:])
