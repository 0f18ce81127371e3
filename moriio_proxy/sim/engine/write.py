"""WRITE mode: the decode announces its blocks and waits; the prefill writes its KV there.

The two legs run concurrently and meet on the prefill's notify port: the decode's
"remote_blocks" notify and the prefill's computed KV can arrive in either order, and the
write happens once both are there. vLLM 0.32 gives the waiting decode no timeout, so a
prefill that never comes (or writes elsewhere) leaves it waiting forever.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ..connector import (
    WriteDestination,
    blocks_notify,
    blocks_ready_message,
    release_message,
    write_prefill_release_target,
)
from ..transport import Transport
from .memory import DpRank, RemoteAlloc, WriteTask
from .request import EngineRequest, OutputQueue
from .runner import ModelRunner, Spawn

logger = logging.getLogger(__name__)


def write_done_message(transfer_id: Any, fingerprint: str) -> dict[str, Any]:
    """P -> D: the KV is in your blocks (the fingerprint stands in for the written KV)."""
    return {"type": "write_done", "transfer_id": transfer_id, "sim_fingerprint": fingerprint}


class WriteTransfers:
    """Both ends of WRITE-mode transfers on one instance."""

    def __init__(
        self, runner: ModelRunner, transport: Transport, ranks: list[DpRank], spawn: Spawn
    ) -> None:
        self._runner = runner
        self._transport = transport
        self._ranks = ranks
        self._spawn = spawn

    def prefilled(
        self, st: DpRank, key: Any, reg_key: Any, fingerprint: str, dest: WriteDestination
    ) -> None:
        """P: the KV is computed; write it once the decode has announced its blocks."""
        if key in st.terminal:
            return
        old = st.write_tasks.pop(key, None)
        if old is not None and old.timer is not None:
            old.timer.cancel()
        task = WriteTask(key, reg_key, fingerprint, dest)
        task.timer = asyncio.get_running_loop().call_later(
            self._runner.config.defer_timeout, self._expire, st, task
        )
        st.write_tasks[key] = task
        if key in st.remote_alloc:
            self._spawn(self._write(st, key))

    def blocks_ready(self, st: DpRank, message: dict[str, Any], block_ids: list[Any]) -> None:
        """P: a decode's "remote_blocks" notify; write now if the KV is already computed."""
        tid = message.get("transfer_id")
        if tid in st.terminal:
            return
        st.remote_alloc[tid] = RemoteAlloc(message.get("decode_rank", 0), list(block_ids))
        if tid in st.write_tasks:
            self._spawn(self._write(st, tid))

    def _expire(self, st: DpRank, task: WriteTask) -> None:
        """0.32 MoRIIOWriter: a deferred write whose remote blocks never came expires."""
        if st.write_tasks.get(task.key) is task:
            del st.write_tasks[task.key]
            st.mark_terminal(task.key)
            st.free(task.reg_key)
            logger.error(
                "%s rank %d: deferred write for transfer %r expired after %.1fs (remote "
                "blocks never arrived), marking done",
                self._runner.tag,
                st.rank,
                task.key,
                self._runner.config.defer_timeout,
            )

    async def _write(self, st: DpRank, key: Any) -> None:
        """Both the prefill's KV and the decode's notify are here: "RDMA-write" the KV.

        The target is the decode address P resolved from ITS OWN leg (request-id sandwich or
        remote_host/remote_notify_port), port + the decode rank from the notify message
        (0.32 _execute_write_task), followed by a write_done notify carrying the KV.
        """
        task = st.write_tasks.pop(key, None)
        alloc = st.remote_alloc.pop(key, None)
        if task is None or alloc is None:
            if task is not None:
                st.write_tasks[key] = task
            if alloc is not None:
                st.remote_alloc[key] = alloc
            return
        if task.timer is not None:
            task.timer.cancel()
        st.mark_terminal(key)
        tag, dest = self._runner.tag, task.dest
        try:
            try:
                hs_port, notify_port = dest.ports(alloc.decode_rank)
            except ValueError:
                logger.error("%s write task failed: bad decode_rank %r", tag, alloc.decode_rank)
                return
            if not await self._transport.handshake(dest.host, hs_port):
                logger.error(
                    "%s write task for transfer %r failed (no handshake with the decode at "
                    "%s:%d), marking done: the decode will wait forever",
                    tag,
                    key,
                    dest.host,
                    hs_port,
                )
                return
            await self._transport.send_oneway(
                dest.host, notify_port, write_done_message(key, task.fingerprint)
            )
            self._runner.stats.kv_writes_sent += 1
        finally:
            st.free(task.reg_key)

    def written(self, st: DpRank, message: dict[str, Any]) -> None:
        """D: a write_done notify wakes the decode waiting for it (or is kept for later)."""
        tid = message.get("transfer_id")
        fingerprint = message.get("sim_fingerprint")
        fut = st.write_waiters.pop(tid, None)
        if fut is not None and not fut.done():
            fut.set_result(fingerprint)
        else:  # 0.32 keeps unmatched completions (_unmatched_write_completions)
            st.unmatched_writes[tid] = fingerprint

    async def decode(self, req: EngineRequest, queue: OutputQueue) -> None:
        """D, WRITE, do_remote_prefill: tell P where to write, wait (forever) for the KV."""
        assert req.kv is not None
        kv, runner = req.kv, self._runner
        st = self._ranks[req.rank]
        tid = req.adopt_transfer_id()
        notify = blocks_notify(kv, req.engine_id, req.rank)
        if notify.unpinned_dp_size:
            logger.warning(
                "%s MoRI-IO decode notify: remote_dp_size=%d but the router did not pin "
                "remote_dp_rank for request %s; defaulting to rank 0",
                runner.tag,
                notify.unpinned_dp_size,
                req.engine_id,
            )
        if notify.target is None:
            logger.warning(
                "%s request %s: remote_dp_rank_override with remote_dp_rank=%r but this "
                "engine is DP rank %d: no notify is sent and the request waits forever "
                "(0.32 behaviour)",
                runner.tag,
                req.engine_id,
                notify.remote_dp_rank,
                req.rank,
            )
        blocks = st.blocks.allocate(len(req.words))
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if tid in st.unmatched_writes:
            fut.set_result(st.unmatched_writes.pop(tid))
        else:
            st.write_waiters[tid] = fut
        notified = False
        waiting = False
        try:
            await runner.compute_prompt(req)
            if notify.target is not None:
                host, port = notify.target
                message = blocks_ready_message(req.engine_id, kv["transfer_id"], blocks, req.rank)
                await self._transport.send_oneway(host, port, message)
            notified = True
            waiting = True
            fingerprint = await fut  # no timeout: vLLM 0.32 has none on the WRITE consumer
            waiting = False
            if isinstance(fingerprint, str):
                runner.stats.kv_received += 1
                seed, garbage = fingerprint, False
            else:
                seed, garbage = runner.garbage(req, "write_done carried no KV"), True
            await runner.emit(req, runner.plan(req, seed, garbage), queue)
        except asyncio.CancelledError:
            if st.write_waiters.get(tid) is fut:
                del st.write_waiters[tid]
            if waiting:
                runner.stats.kv_wait_cancelled += 1
                logger.warning(
                    "%s request %s cancelled while waiting for KV (transfer %s): vLLM 0.32 "
                    "leaks its %d blocks until restart",
                    runner.tag,
                    req.engine_id,
                    tid,
                    len(blocks),
                )
            elif not notified:
                self._spawn(self._release_prefill(kv, req.engine_id))
            raise

    async def _release_prefill(self, kv: dict[str, Any], request_id: str) -> None:
        """0.32 _release_write_prefill_blocks: abort before scheduling frees P's blocks."""
        target = write_prefill_release_target(kv, request_id)
        if target is None:
            return
        await self._transport.send_oneway(
            target[0],
            target[1],
            release_message(kv.get("transfer_id"), self._runner.config.tp_size),
        )
