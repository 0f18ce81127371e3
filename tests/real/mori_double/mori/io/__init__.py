"""A test double of AMD's ``mori.io`` for CPU memory: the KV bytes really move, over TCP.

vLLM's ``MoRIIOConnector`` needs ``mori.io`` (ROCm, with RDMA NICs or XGMI) for one job:
copying byte ranges of a peer engine's registered KV cache into its own (READ mode) or
into the peer's (WRITE mode). This package offers the calls vLLM 0.32's connector makes
(``IOEngine(key, IOEngineConfig(host, port))``, ``create_backend``, ``get_engine_desc`` /
``register_remote_engine``, ``register_torch_tensor`` -> ``MemoryDesc``,
``create_session``, ``allocate_transfer_uid``, ``Session.batch_read`` / ``batch_write``,
status objects with ``Succeeded``/``Failed``/``Code``/``Message``, ``StatusCode``,
``PollCqMode``, packed ``EngineDesc``/``MemoryDesc``) so that two CPU vLLM engines run
the unmodified connector. Every ``IOEngine`` serves the memory registered with it on its
configured port; a session reads or writes ranges of the peer's registered memory
through that port and copies them from or into local registered memory by address, as
an RDMA NIC would. Nothing above that is simulated: if the connector asks for the wrong
blocks, it gets the wrong bytes.

It lives under tests/ and reaches the engines' import path only through the ``kv`` part
of the real-vLLM tier (tests/real/kv/conftest.py puts tests/real/mori_double on their
``PYTHONPATH``). It imports neither torch nor vLLM.

Fault injection, so that the tests can fail: when ``MORI_DOUBLE_FAULT_FILE`` names a file,
the engine reads it before serving each transfer. ``flip`` flips the lowest bit of every
byte it serves (read) or receives (write) while reporting success: silent corruption.
``fail`` refuses the transfer with ``ERR_RDMA_OP``. Anything else, or no file: normal.
Each transfer an engine initiates is logged on stderr (the vLLM engine's log) as one
``mori-double: read|write uid=N K ranges B bytes peer=KEY`` line.
"""

from .descriptors import (
    BackendType,
    EngineDesc,
    IOEngineConfig,
    MemoryDesc,
    MemoryLocationType,
    PollCqMode,
    RdmaBackendConfig,
    StatusCode,
    TcpBackendConfig,
    TransferStatus,
    XgmiBackendConfig,
)
from .engine import IOEngine, IOEngineSession
from .wire import FAULT_FILE_ENV

__all__ = [
    "FAULT_FILE_ENV",
    "BackendType",
    "EngineDesc",
    "IOEngine",
    "IOEngineConfig",
    "IOEngineSession",
    "MemoryDesc",
    "MemoryLocationType",
    "PollCqMode",
    "RdmaBackendConfig",
    "StatusCode",
    "TcpBackendConfig",
    "TransferStatus",
    "XgmiBackendConfig",
]
