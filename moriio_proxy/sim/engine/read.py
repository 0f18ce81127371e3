"""READ mode: the decode pulls the prefill's KV by block id, then releases the blocks.

An RDMA read addresses block ids in one prefill rank's memory; the transfer_id plays no
part. The simulated read is a request on that rank's notify port answered with the KV
fingerprint, so wrong ids, a wrong rank or a wrong port all end in a garbage answer.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ..connector import (
    NoTransfer,
    ReadSource,
    external_prompt_tokens,
    read_source,
    release_message,
)
from ..model import kv_fingerprint
from ..transport import Transport
from .memory import DpRank
from .request import EngineRequest, OutputQueue
from .runner import ModelRunner, Spawn

logger = logging.getLogger(__name__)


def read_message(source: ReadSource) -> dict[str, Any]:
    """D -> P: stands in for the RDMA read of ``source.block_ids``."""
    return {"type": "sim_read", "transfer_id": source.transfer_id, "block_ids": source.block_ids}


class ReadTransfers:
    """Both ends of READ-mode transfers on one instance."""

    def __init__(self, runner: ModelRunner, transport: Transport, spawn: Spawn) -> None:
        self._runner = runner
        self._transport = transport
        self._spawn = spawn

    async def decode(self, req: EngineRequest, queue: OutputQueue) -> None:
        """D, READ, do_remote_prefill: pull P's KV by block id, then decode from it."""
        assert req.kv is not None
        cfg, runner = self._runner.config, self._runner
        req.adopt_transfer_id()
        # READ recomputes the last prompt token locally; the rest must come from P.
        num_external = external_prompt_tokens(cfg.role, cfg.mode, len(req.words))
        source = read_source(req.kv, req.engine_id, num_external, local_tp=cfg.tp_size)
        if isinstance(source, NoTransfer) and source.invalid_params:
            logger.warning(
                "%s Got invalid KVTransferParams: %s. This request will not utilize KVTransfer",
                runner.tag,
                req.kv,
            )
        released = False
        try:
            await runner.compute_prompt(req)
            fingerprint: str | None = None
            why = source.why if isinstance(source, NoTransfer) else ""
            if isinstance(source, ReadSource):
                if source.block_ids is not None:
                    fingerprint, why = await self._read(source)
                await self._release(source)
                released = True
            if num_external == 0:
                seed, garbage = kv_fingerprint(req.text), False  # nothing external to load
            elif fingerprint is not None:
                runner.stats.kv_received += 1
                seed, garbage = fingerprint, False
            else:
                seed, garbage = runner.garbage(req, why), True
            await runner.emit(req, runner.plan(req, seed, garbage), queue)
        except asyncio.CancelledError:
            if isinstance(source, ReadSource) and not released:
                # request_finished with do_remote_prefill still set: release P's blocks.
                self._spawn(self._release(source))
            raise

    async def _read(self, source: ReadSource) -> tuple[str | None, str]:
        """(fingerprint, "") after a good read; (None, why) otherwise."""
        host = source.host
        if not await self._transport.handshake(host, source.handshake_port):
            return None, f"no handshake with {host}:{source.handshake_port}"
        port = source.notify_port
        data = await self._transport.call(host, port, read_message(source))
        if data is None:
            return None, (
                f"KV read from {host}:{port} timed out after "
                f"{self._runner.config.transfer_timeout:.1f}s"
            )
        if isinstance(data, dict) and data.get("ok") and isinstance(data.get("fingerprint"), str):
            return data["fingerprint"], ""
        err = data.get("error") if isinstance(data, dict) else repr(data)
        return None, f"KV read from {host}:{port} failed: {err}"

    async def _release(self, source: ReadSource) -> None:
        await self._transport.send_oneway(
            source.host,
            source.notify_port,
            release_message(source.transfer_id, self._runner.config.tp_size),
        )

    def serve(self, st: DpRank, message: dict[str, Any]) -> dict[str, Any]:
        """P: answer a read; it succeeds iff these exact block ids hold computed KV here."""
        runner = self._runner
        if runner.config.role != "P":
            return {"ok": False, "error": "not a prefill instance"}
        wanted = message.get("block_ids")
        fingerprint = st.computed_kv(wanted)
        if fingerprint is not None:
            runner.stats.kv_reads_served += 1
            return {"ok": True, "fingerprint": fingerprint}
        logger.warning(
            "%s rank %d: KV read of blocks %r (transfer %r) hits no computed KV: the decode "
            "will get garbage",
            runner.tag,
            st.rank,
            wanted,
            message.get("transfer_id"),
        )
        return {"ok": False, "error": f"blocks {wanted!r} hold no KV on rank {st.rank}"}
