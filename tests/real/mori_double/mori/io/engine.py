"""``IOEngine`` and ``Session`` of the ``mori.io`` double.

Each engine listens on its configured TCP port and serves the memory registered with it
(the target side of a one-sided transfer); the transfers it initiates run in order on one
thread, so a posted transfer returns an in-progress status at once and completes later,
as mori's do.
"""

from __future__ import annotations

import contextlib
import itertools
import queue
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from . import wire
from .descriptors import (
    BackendType,
    EngineDesc,
    IOEngineConfig,
    MemoryDesc,
    MemoryLocationType,
    StatusCode,
    TransferStatus,
)
from .wire import TransferRefused


class Tensor(Protocol):
    """What registration needs of a tensor (torch's, or a test's stand-in)."""

    def data_ptr(self) -> int: ...
    def nelement(self) -> int: ...
    def element_size(self) -> int: ...
    def is_contiguous(self) -> bool: ...


@dataclass(frozen=True)
class _Region:
    desc: MemoryDesc
    owner: object  # the registered tensor: keeps its memory alive while registered


@dataclass(frozen=True)
class _Job:
    op: str  # "read" | "write"
    session: IOEngineSession
    local_offsets: list[int]
    remote_offsets: list[int]
    sizes: list[int]
    uid: int
    status: TransferStatus


class IOEngineSession:
    """Transfers between one local and one remote registered region (mori's name)."""

    def __init__(self, engine: IOEngine, local: MemoryDesc, remote: MemoryDesc) -> None:
        self._engine = engine
        self.local = local
        self.remote = remote

    def batch_read(
        self, local_offsets: Sequence[int], remote_offsets: Sequence[int],
        sizes: Sequence[int], transfer_uid: int,
    ) -> TransferStatus:  # fmt: skip
        return self._engine.post("read", self, local_offsets, remote_offsets, sizes, transfer_uid)

    def batch_write(
        self, local_offsets: Sequence[int], remote_offsets: Sequence[int],
        sizes: Sequence[int], transfer_uid: int,
    ) -> TransferStatus:  # fmt: skip
        return self._engine.post("write", self, local_offsets, remote_offsets, sizes, transfer_uid)

    def read(self, local_offset: int, remote_offset: int, size: int, uid: int) -> TransferStatus:
        return self.batch_read([local_offset], [remote_offset], [size], uid)

    def write(self, local_offset: int, remote_offset: int, size: int, uid: int) -> TransferStatus:
        return self.batch_write([local_offset], [remote_offset], [size], uid)

    def alive(self) -> bool:
        return not self._engine.closed


class IOEngine:
    Session = IOEngineSession  # vLLM annotates its sessions as IOEngine.Session

    def __init__(self, key: str, config: IOEngineConfig) -> None:
        self.key = key
        self._listener = socket.create_server((config.host, config.port))
        self._desc = EngineDesc(key, config.host, self._listener.getsockname()[1])
        self._backends: dict[BackendType, object] = {}
        self._remotes: dict[str, EngineDesc] = {}
        self._regions: dict[int, _Region] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._uids = itertools.count(1)
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._peers: dict[str, socket.socket] = {}  # used by the transfer thread only
        self._served: set[socket.socket] = set()  # connections from peers
        self.closed = False
        for loop, name in ((self._accept_loop, "accept"), (self._transfer_loop, "transfer")):
            threading.Thread(target=loop, daemon=True, name=f"mori-double-{name}").start()
        wire.log(f"engine {key} serving on {self._desc.host}:{self._desc.port}")

    # ------------------------------------------------------------------ control plane

    def create_backend(self, backend_type: BackendType, config: object = None) -> None:
        if backend_type is BackendType.XGMI:
            raise RuntimeError("mori double: XGMI needs GPUs; use the RDMA backend")
        self._backends[backend_type] = config

    def get_engine_desc(self) -> EngineDesc:
        return self._desc

    def register_remote_engine(self, desc: EngineDesc) -> None:
        with self._lock:
            self._remotes[desc.key] = desc

    def deregister_remote_engine(self, desc: EngineDesc) -> None:
        with self._lock:
            self._remotes.pop(desc.key, None)

    def register_torch_tensor(self, tensor: Tensor) -> MemoryDesc:
        if not tensor.is_contiguous():
            raise RuntimeError("input tensor must be contiguous")
        device = getattr(getattr(tensor, "device", None), "type", "cpu")
        if device != "cpu":
            raise RuntimeError(f"mori double: CPU memory only, got a {device} tensor")
        desc = MemoryDesc(
            engine_key=self.key,
            id=next(self._ids),
            data=tensor.data_ptr(),
            size=tensor.nelement() * tensor.element_size(),
            device_id=-1,
            loc=MemoryLocationType.CPU.name,
        )
        with self._lock:
            self._regions[desc.id] = _Region(desc, tensor)
        return desc

    def deregister_memory(self, desc: MemoryDesc) -> None:
        with self._lock:
            self._regions.pop(desc.id, None)

    def allocate_transfer_uid(self) -> int:
        return next(self._uids)

    def create_session(self, local: MemoryDesc, remote: MemoryDesc) -> IOEngineSession | None:
        with self._lock:
            known = local.id in self._regions and remote.engine_key in self._remotes
        return IOEngineSession(self, local, remote) if known else None

    def shutdown(self) -> None:
        """Stop serving and initiating, as if the process had gone away."""
        self.closed = True
        self._jobs.put(None)
        with self._lock:
            sockets = [self._listener, *self._served]
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes the threads blocked on them
            sock.close()

    # ------------------------------------------------------------------ initiator side

    def post(
        self, op: str, session: IOEngineSession, local_offsets: Sequence[int],
        remote_offsets: Sequence[int], sizes: Sequence[int], uid: int,
    ) -> TransferStatus:  # fmt: skip
        status = TransferStatus()
        job = _Job(op, session, list(local_offsets), list(remote_offsets), list(sizes), uid, status)
        self._jobs.put(job)
        return status

    def _transfer_loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                self._run(job)
                # Logged before the status completes: once it has, the connector may
                # notify its peer, and a test may read this log.
                wire.log(
                    f"{job.op} uid={job.uid} {len(job.sizes)} ranges {sum(job.sizes)} bytes "
                    f"peer={job.session.remote.engine_key}"
                )
                job.status.finish(StatusCode.SUCCESS)
            except TransferRefused as exc:
                wire.log(f"{job.op} uid={job.uid} refused: {exc.code.name} {exc}")
                job.status.finish(exc.code, str(exc))
            except (OSError, ValueError) as exc:
                self._drop_peer(job.session.remote.engine_key)
                wire.log(f"{job.op} uid={job.uid} failed: {exc}")
                job.status.finish(StatusCode.ERR_RDMA_OP, f"mori double transport: {exc}")

    def _run(self, job: _Job) -> None:
        with self._lock:
            region = self._regions.get(job.session.local.id)
            peer = self._remotes.get(job.session.remote.engine_key)
        if region is None or peer is None:
            raise TransferRefused(StatusCode.ERR_NOT_FOUND, "session memory or peer unknown")
        local = wire.check_ranges(job.local_offsets, job.sizes, region.desc.size, "local")
        wire.check_ranges(job.remote_offsets, job.sizes, job.session.remote.size, "remote")
        header = {
            "op": job.op,
            "engine": peer.key,
            "mem": job.session.remote.id,
            "offsets": job.remote_offsets,
            "sizes": job.sizes,
        }
        sock = self._peer(peer)
        if job.op == "read":
            wire.send_frame(sock, header)
            answer = wire.recv_header(sock)
            payload = wire.recv_exact(sock, int(answer.get("bytes", 0)))
            _raise_unless_success(answer)
            wire.scatter(region.desc.data, local, payload)
        else:
            wire.send_frame(sock, header, bytes(wire.gather(region.desc.data, local)))
            _raise_unless_success(wire.recv_header(sock))

    def _peer(self, desc: EngineDesc) -> socket.socket:
        sock = self._peers.get(desc.key)
        if sock is None:
            sock = socket.create_connection((desc.host, desc.port), timeout=30)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._peers[desc.key] = sock
        return sock

    def _drop_peer(self, key: str) -> None:
        sock = self._peers.pop(key, None)
        if sock is not None:
            sock.close()

    # ------------------------------------------------------------------ target side

    def _accept_loop(self) -> None:
        while not self.closed:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with self._lock:
            self._served.add(conn)
        with conn:
            while not self.closed:
                try:
                    header = wire.recv_header(conn)
                    size = sum(int(s) for s in header.get("sizes", []))
                    payload = wire.recv_exact(conn, size) if header.get("op") == "write" else b""
                except (OSError, ValueError):
                    return
                try:
                    answer, data = self._handle(header, payload)
                except TransferRefused as exc:
                    answer, data = {"code": exc.code.name, "message": str(exc)}, b""
                try:
                    wire.send_frame(conn, answer, data)
                except OSError:
                    return

    def _handle(
        self, header: dict[str, Any], payload: bytes | bytearray
    ) -> tuple[dict[str, Any], bytes]:
        if header.get("engine") != self.key:
            raise TransferRefused(StatusCode.ERR_NOT_FOUND, f"this is engine {self.key}")
        with self._lock:
            region = self._regions.get(int(header.get("mem", -1)))
        if region is None:
            raise TransferRefused(StatusCode.ERR_NOT_FOUND, f"no memory {header.get('mem')}")
        ranges = wire.check_ranges(header["offsets"], header["sizes"], region.desc.size, "remote")
        fault = wire.fault()
        if fault == "fail":
            raise TransferRefused(StatusCode.ERR_RDMA_OP, "injected failure (fault file)")
        corrupt: Callable[[bytes | bytearray], bytes | bytearray] = (
            wire.flip if fault == "flip" else (lambda data: data)
        )
        if header["op"] == "read":
            data = corrupt(wire.gather(region.desc.data, ranges))
            return {"code": "SUCCESS", "bytes": len(data)}, bytes(data)
        if header["op"] == "write":
            wire.scatter(region.desc.data, ranges, corrupt(payload))
            return {"code": "SUCCESS"}, b""
        raise TransferRefused(StatusCode.ERR_INVALID_ARGS, f"unknown op {header['op']!r}")


def _raise_unless_success(answer: dict[str, Any]) -> None:
    code = StatusCode[answer.get("code", "ERR_BAD_STATE")]
    if code is not StatusCode.SUCCESS:
        raise TransferRefused(code, str(answer.get("message", "")))
