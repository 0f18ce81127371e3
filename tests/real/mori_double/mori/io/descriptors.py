"""The value types of the ``mori.io`` double: enums, backend configs, the packed engine and
memory descriptors the connector ships over its handshake, and transfer statuses.

Names and shapes follow mori's Python binding (``mori.cpp``) as vLLM 0.32's connector uses
them; the packed form is JSON, opaque to the connector, which only moves the bytes.
"""

from __future__ import annotations

import enum
import json
import threading
from dataclasses import asdict, dataclass
from typing import Any


class BackendType(enum.Enum):
    UNKNOWN = 0
    XGMI = 1
    RDMA = 2
    TCP = 3


class PollCqMode(enum.Enum):
    POLLING = 0
    EVENT = 1


class StatusCode(enum.Enum):
    SUCCESS = 0
    INIT = 1
    IN_PROGRESS = 2
    ERR_INVALID_ARGS = 3
    ERR_NOT_FOUND = 4
    ERR_RDMA_OP = 5
    ERR_BAD_STATE = 6
    ERR_GPU_OP = 7


class MemoryLocationType(enum.Enum):
    CPU = 0
    GPU = 1


@dataclass(frozen=True)
class IOEngineConfig:
    host: str
    port: int


@dataclass(frozen=True)
class RdmaBackendConfig:
    """Accepted and recorded: there is no NIC to tune."""

    qp_per_transfer: int = 1
    post_batch_size: int = -1
    num_worker_threads: int = 1
    poll_cq_mode: PollCqMode = PollCqMode.POLLING
    enable_notification: bool = True


@dataclass(frozen=True)
class XgmiBackendConfig:
    """XGMI copies between the GPUs of one node; the double refuses it (no GPU)."""


@dataclass(frozen=True)
class TcpBackendConfig:
    pass


def _pack(obj: Any) -> bytes:
    return json.dumps(asdict(obj), sort_keys=True).encode()


@dataclass(frozen=True)
class EngineDesc:
    key: str
    host: str
    port: int

    def pack(self) -> bytes:
        return _pack(self)

    @staticmethod
    def unpack(data: bytes) -> EngineDesc:
        return EngineDesc(**json.loads(data))


@dataclass(frozen=True)
class MemoryDesc:
    engine_key: str
    id: int
    data: int  # address of the first byte (the connector derives layer offsets from it)
    size: int  # bytes
    device_id: int
    loc: str

    def pack(self) -> bytes:
        return _pack(self)

    @staticmethod
    def unpack(data: bytes) -> MemoryDesc:
        return MemoryDesc(**json.loads(data))


class TransferStatus:
    """One transfer's outcome: in progress when posted, completed by the engine's transfer
    thread (the connector polls ``Succeeded``/``Failed``, as with mori's completion queue)."""

    def __init__(self) -> None:
        self._code = StatusCode.IN_PROGRESS
        self._message = ""
        self._done = threading.Event()

    def Code(self) -> StatusCode:
        return self._code

    def Message(self) -> str:
        return self._message

    def Init(self) -> bool:
        return self._code is StatusCode.INIT

    def InProgress(self) -> bool:
        return not self._done.is_set()

    def Succeeded(self) -> bool:
        return self._done.is_set() and self._code is StatusCode.SUCCESS

    def Failed(self) -> bool:
        return self._done.is_set() and self._code is not StatusCode.SUCCESS

    def Wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def finish(self, code: StatusCode, message: str = "") -> None:
        self._message = message
        self._code = code
        self._done.set()
