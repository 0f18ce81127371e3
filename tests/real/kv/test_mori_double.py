"""The mori.io double on its own (no vLLM, no torch: always runs).

The real-KV tests trust it to move exactly the ranges the connector asks for, to fail
loudly on what an RDMA NIC would refuse, and to corrupt bytes only when told: checked
here with two engines in this process and ctypes buffers standing in for tensors.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.real.mori_double.mori import io as mori

TIMEOUT = 10.0
Pair = tuple[mori.IOEngine, mori.IOEngine]


class Buffer:
    """A contiguous byte buffer with the tensor methods register_torch_tensor uses."""

    def __init__(self, data: bytes, contiguous: bool = True) -> None:
        self.raw = (ctypes.c_char * len(data)).from_buffer_copy(data)
        self.contiguous = contiguous

    def data_ptr(self) -> int:
        return ctypes.addressof(self.raw)

    def nelement(self) -> int:
        return len(self.raw)

    def element_size(self) -> int:
        return 1

    def is_contiguous(self) -> bool:
        return self.contiguous

    def bytes(self) -> bytes:
        return bytes(self.raw)


def engine(key: str) -> mori.IOEngine:
    e = mori.IOEngine(key, mori.IOEngineConfig("127.0.0.1", 0))
    e.create_backend(mori.BackendType.RDMA, mori.RdmaBackendConfig(1, -1, 1))
    return e


@pytest.fixture
def pair() -> Iterator[Pair]:
    """A producer and a consumer that know each other, as after the connector's handshake
    (which ships the descriptors packed)."""
    producer, consumer = engine("producer"), engine("consumer")
    for a, b in ((producer, consumer), (consumer, producer)):
        a.register_remote_engine(mori.EngineDesc.unpack(b.get_engine_desc().pack()))
    yield producer, consumer
    producer.shutdown()
    consumer.shutdown()


def session(pair: Pair, remote: Buffer, local: Buffer) -> mori.IOEngineSession:
    producer, consumer = pair
    remote_desc = mori.MemoryDesc.unpack(producer.register_torch_tensor(remote).pack())
    local_desc = consumer.register_torch_tensor(local)
    created = consumer.create_session(local_desc, remote_desc)
    assert created is not None
    return created


def done(status: mori.TransferStatus) -> mori.TransferStatus:
    assert status.Wait(TIMEOUT), "transfer never completed"
    return status


def test_batch_read_moves_exactly_the_ranges(pair: Pair) -> None:
    remote, local = Buffer(bytes(range(256))), Buffer(b"\0" * 64)
    s = session(pair, remote, local)
    status = s.batch_read([0, 40], [16, 200], [8, 4], pair[1].allocate_transfer_uid())
    assert done(status).Succeeded() and not status.Failed()
    assert status.Code() is mori.StatusCode.SUCCESS
    assert local.bytes() == bytes(range(16, 24)) + b"\0" * 32 + bytes(range(200, 204)) + b"\0" * 20
    assert remote.bytes() == bytes(range(256))  # a read leaves the source alone


def test_batch_write_moves_exactly_the_ranges(pair: Pair) -> None:
    remote, local = Buffer(b"\0" * 32), Buffer(b"abcdefgh")
    s = session(pair, remote, local)
    assert done(s.batch_write([2], [30], [2], 7)).Succeeded()
    assert done(s.write(0, 0, 1, 8)).Succeeded()
    assert remote.bytes() == b"a" + b"\0" * 29 + b"cd"


def test_descriptors_survive_packing(pair: Pair) -> None:
    producer, _ = pair
    desc = producer.register_torch_tensor(Buffer(b"xyz"))
    assert mori.MemoryDesc.unpack(desc.pack()) == desc
    assert (desc.size, desc.data, desc.engine_key) == (3, desc.data, "producer")
    engine_desc = producer.get_engine_desc()
    assert mori.EngineDesc.unpack(engine_desc.pack()) == engine_desc
    assert engine_desc.port > 0


@pytest.mark.parametrize(
    ("local_offset", "remote_offset", "size"),
    [(0, 30, 4), (62, 0, 4), (-1, 0, 1)],
    ids=["past the remote region", "past the local region", "negative offset"],
)
def test_out_of_range_transfer_fails_and_moves_nothing(
    pair: Pair, local_offset: int, remote_offset: int, size: int
) -> None:
    remote, local = Buffer(b"r" * 32), Buffer(b"l" * 64)
    s = session(pair, remote, local)
    status = done(s.batch_read([local_offset], [remote_offset], [size], 1))
    assert status.Failed() and not status.Succeeded()
    assert status.Code() is mori.StatusCode.ERR_INVALID_ARGS and "outside" in status.Message()
    assert local.bytes() == b"l" * 64


def test_flip_fault_corrupts_silently(
    pair: Pair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fault = tmp_path / "fault"
    monkeypatch.setenv(mori.FAULT_FILE_ENV, str(fault))
    remote, local = Buffer(bytes(range(16))), Buffer(b"\0" * 16)
    s = session(pair, remote, local)
    fault.write_text("flip\n")
    assert done(s.batch_read([0], [0], [16], 1)).Succeeded()
    assert local.bytes() == bytes(b ^ 1 for b in range(16))
    fault.write_text("")  # back to normal service
    assert done(s.batch_read([0], [0], [16], 2)).Succeeded()
    assert local.bytes() == bytes(range(16))


def test_fail_fault_refuses_the_transfer(
    pair: Pair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fault = tmp_path / "fault"
    fault.write_text("fail")
    monkeypatch.setenv(mori.FAULT_FILE_ENV, str(fault))
    remote, local = Buffer(b"r" * 8), Buffer(b"l" * 8)
    status = done(session(pair, remote, local).batch_write([0], [0], [8], 1))
    assert status.Failed() and status.Code() is mori.StatusCode.ERR_RDMA_OP
    assert remote.bytes() == b"r" * 8


def test_a_vanished_peer_is_a_failed_transfer_not_a_hang(pair: Pair) -> None:
    remote, local = Buffer(b"r" * 8), Buffer(b"l" * 8)
    s = session(pair, remote, local)
    pair[0].shutdown()
    status = done(s.batch_read([0], [0], [8], 1))
    assert status.Failed() and status.Code() is mori.StatusCode.ERR_RDMA_OP


def test_what_mori_refuses(pair: Pair) -> None:
    producer, consumer = pair
    with pytest.raises(RuntimeError, match="contiguous"):
        producer.register_torch_tensor(Buffer(b"ab", contiguous=False))
    with pytest.raises(RuntimeError, match="XGMI"):
        producer.create_backend(mori.BackendType.XGMI, mori.XgmiBackendConfig())
    local = consumer.register_torch_tensor(Buffer(b"ab"))
    stranger = mori.MemoryDesc("stranger", 1, 0, 2, -1, "CPU")
    assert consumer.create_session(local, stranger) is None  # peer never registered
