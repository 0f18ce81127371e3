"""How the ``mori.io`` double moves bytes: frames on a TCP connection, and the memory
side (checked ranges gathered from or scattered to registered addresses).

A request frame is a 4-byte length, a JSON header (op, target engine, memory id, remote
offsets and sizes) and, for a write, the payload; the answer is the same framing with a
status code and, for a read, the bytes. Memory is addressed as an RDMA NIC addresses it:
the registered base address plus an offset, copied with ``ctypes``.
"""

from __future__ import annotations

import ctypes
import json
import os
import socket
import struct
import sys
from collections.abc import Sequence
from typing import Any

from .descriptors import StatusCode

FAULT_FILE_ENV = "MORI_DOUBLE_FAULT_FILE"
_LENGTH = struct.Struct("!I")
_MAX_HEADER = 16 << 20
_FLIP = bytes(b ^ 0x01 for b in range(256))

Ranges = list[tuple[int, int]]  # (offset, size) pairs


class TransferRefused(Exception):
    """A transfer the double refuses, with the status code mori would report."""

    def __init__(self, code: StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def log(message: str) -> None:
    """One line on stderr, which is the engine's log."""
    print(f"mori-double: {message}", file=sys.stderr, flush=True)


def fault() -> str:
    """The injected fault in force now: "flip", "fail" or "" (see the package docstring)."""
    path = os.environ.get(FAULT_FILE_ENV)
    if not path:
        return ""
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def flip(data: bytes | bytearray) -> bytearray:
    """The lowest bit of every byte flipped: same length, every value changed."""
    return bytearray(data.translate(_FLIP))


def check_ranges(offsets: Sequence[int], sizes: Sequence[int], limit: int, what: str) -> Ranges:
    if len(offsets) != len(sizes):
        raise TransferRefused(
            StatusCode.ERR_INVALID_ARGS, f"{len(offsets)} {what} offsets for {len(sizes)} sizes"
        )
    ranges = [(int(o), int(s)) for o, s in zip(offsets, sizes, strict=True)]
    for offset, size in ranges:
        if offset < 0 or size < 0 or offset + size > limit:
            raise TransferRefused(
                StatusCode.ERR_INVALID_ARGS,
                f"{what} range [{offset}, {offset + size}) outside the {limit} registered bytes",
            )
    return ranges


def gather(base: int, ranges: Ranges) -> bytearray:
    out = bytearray()
    for offset, size in ranges:
        out += ctypes.string_at(base + offset, size)
    return out


def scatter(base: int, ranges: Ranges, data: bytes | bytearray) -> None:
    total = sum(size for _, size in ranges)
    if len(data) != total:
        raise TransferRefused(StatusCode.ERR_BAD_STATE, f"got {len(data)} bytes for {total}")
    source = (ctypes.c_char * total).from_buffer(bytearray(data))
    at = 0
    for offset, size in ranges:
        ctypes.memmove(base + offset, ctypes.addressof(source) + at, size)
        at += size


def send_frame(sock: socket.socket, header: dict[str, Any], payload: bytes = b"") -> None:
    raw = json.dumps(header).encode()
    sock.sendall(_LENGTH.pack(len(raw)) + raw + payload)


def recv_exact(sock: socket.socket, size: int) -> bytearray:
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError("peer closed the connection")
        got += n
    return buf


def recv_header(sock: socket.socket) -> dict[str, Any]:
    (length,) = _LENGTH.unpack(recv_exact(sock, _LENGTH.size))
    if length > _MAX_HEADER:
        raise ConnectionError(f"header of {length} bytes")
    header: dict[str, Any] = json.loads(recv_exact(sock, length))
    return header
