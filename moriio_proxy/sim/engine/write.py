"""WRITE mode: the decode announces its blocks and waits; the prefill writes its KV there.

The two legs run concurrently and meet on the prefill's notify port: the decode's
"remote_blocks" notify and the prefill's computed KV can arrive in either order, and the
write happens once both are there. The waiting decode has no timeout of its own. In vLLM
0.32 a prefill that never comes (or writes elsewhere) leaves it waiting forever; in 0.33 a
prefill whose computed KV waited ``defer_timeout`` for the decode's blocks tells every
decode DP rank "write_failed", and a 0.33 decode then fails the request (a 0.32 decode's
notify listener dies on that message). A prefill that never ran, or whose write fails,
still leaves the decode waiting in both.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from ..connector import (
    WriteDestination,
    blocks_notify,
    blocks_ready_message,
    release_message,
    write_failed_message,
    write_prefill_release_target,
    write_refusal,
)
from ..tp_mapping import DecodeFacts, allocation_fanout, missing_allocation, write_problem
from ..transport import NotifyListenerDied, Transport
from .memory import DpRank, RemoteAlloc, WriteTask
from .request import KV_LOAD_FAILED, EngineRequest, OutputQueue
from .runner import ModelRunner, Spawn

logger = logging.getLogger(__name__)

#: What a decode's KV wait ends with when the prefill said "write_failed" (0.33).
WRITE_FAILED = object()
_MAX_UNMAPPED_FAILURES = 4096  # 0.33 keeps failures for ids not mapped yet in an LRU


@dataclass
class WriteAlloc(RemoteAlloc):
    """A decode's "remote_blocks" notify and what the prefill knows of that decode."""

    facts: DecodeFacts | None = None


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
        # D, 0.33: write_failed for transfer ids no waiting request has mapped yet.
        self._unmapped_failures: list[OrderedDict[Any, None]] = [OrderedDict() for _ in ranks]

    @property
    def _version(self) -> str:
        return self._runner.config.vllm_version

    def prefilled(
        self, st: DpRank, key: Any, reg_key: Any, fingerprint: str, dest: WriteDestination
    ) -> None:
        """P: the KV is computed; write it once the decode has announced its blocks.

        A 0.33 prefill maps its TP ranks onto the decode's in the forward that saves the
        KV, and a topology it cannot map kills the engine there (EngineCoreFatal).
        """
        write_refusal(self._version, self._runner.config.tp_size, dest)
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
        """P: a decode's "remote_blocks" notify; write now if the KV is already computed.

        An allocation that reached only some of this prefill's TP ranks (the decode named
        a smaller prefill TP) is as good as lost: the ranks without it wait until
        defer_timeout.
        """
        tid = message.get("transfer_id")
        if tid in st.terminal:
            return
        cfg = self._runner.config
        facts = DecodeFacts.of(message, cfg.tp_size, cfg.vllm_version)
        missing = missing_allocation(cfg.tp_size, facts)
        if missing is not None:
            logger.error("%s rank %d transfer %r: %s", self._runner.tag, st.rank, tid, missing)
            return
        alloc = WriteAlloc(message.get("decode_rank", 0), list(block_ids), facts)
        st.remote_alloc[tid] = alloc
        if tid in st.write_tasks:
            self._spawn(self._write(st, tid))

    def _expire(self, st: DpRank, task: WriteTask) -> None:
        """MoRIIOWriter: a deferred write whose remote blocks never came expires. 0.32
        frees it silently (the decode waits forever); 0.33 also tells every decode DP rank
        of the leg's remote_dp_size that this transfer failed."""
        if st.write_tasks.get(task.key) is not task:
            return
        del st.write_tasks[task.key]
        st.mark_terminal(task.key)
        st.free(task.reg_key)
        cfg = self._runner.config
        logger.error(
            "%s rank %d: deferred write for transfer %r expired after %.1fs (remote "
            "blocks never arrived), marking done%s",
            self._runner.tag,
            st.rank,
            task.key,
            cfg.defer_timeout,
            "" if self._version == "0.32" else "; telling the decode ranks write_failed",
        )
        if self._version != "0.32":
            self._spawn(self._notify_failed(task))

    async def _notify_failed(self, task: WriteTask) -> None:
        dest = task.dest
        for port in dest.failure_ports():
            await self._transport.send_oneway(dest.host, port, write_failed_message(task.key))
            self._runner.stats.write_failed_sent += 1

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
        tag, dest, cfg = self._runner.tag, task.dest, self._runner.config
        try:
            facts = alloc.facts if isinstance(alloc, WriteAlloc) else None
            problem = None
            if facts is not None:
                problem = write_problem(
                    cfg.vllm_version, cfg.tp_size, dest.tp_size or cfg.tp_size, facts
                )
            if problem is not None:
                logger.error(
                    "%s write task for transfer %r failed (%s), marking done: the decode "
                    "will wait forever",
                    tag,
                    key,
                    problem,
                )
                return
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

    def failed(self, st: DpRank, message: dict[str, Any]) -> None:
        """D: a prefill's write_failed. 0.33 fails the request waiting for that transfer,
        or the one that maps it later (kept in a bounded LRU meanwhile). 0.32 knows no
        such message: its notify listener raises and dies, so this rank never hears of
        a finished write again while the instance keeps heartbeating."""
        if self._version == "0.32":
            # Counted here, the same step the listener returns in: nothing reaches it after.
            self._runner.stats.notify_listeners_died += 1
            raise NotifyListenerDied("unknown message type 'write_failed' (vLLM 0.32)")
        tid = message.get("transfer_id")
        fut = st.write_waiters.pop(tid, None)
        if fut is not None and not fut.done():
            fut.set_result(WRITE_FAILED)
            return
        pending = self._unmapped_failures[st.rank]
        pending[tid] = None
        pending.move_to_end(tid)
        while len(pending) > _MAX_UNMAPPED_FAILURES:
            pending.popitem(last=False)

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
        elif tid in self._unmapped_failures[req.rank]:
            del self._unmapped_failures[req.rank][tid]
            fut.set_result(WRITE_FAILED)
        else:
            st.write_waiters[tid] = fut
        notified = False
        waiting = False
        try:
            await runner.compute_prompt(req)
            if notify.target is not None:
                host, port = notify.target
                cfg = runner.config
                facts = DecodeFacts(
                    cfg.tp_size,
                    cfg.vllm_version,
                    allocation_fanout(cfg.vllm_version, cfg.tp_size, kv),
                )
                message = blocks_ready_message(
                    req.engine_id, kv["transfer_id"], blocks, req.rank, facts
                )
                await self._transport.send_oneway(host, port, message)
            notified = True
            waiting = True
            fingerprint = await fut  # no timeout of its own, in 0.32 and 0.33 alike
            waiting = False
            if fingerprint is WRITE_FAILED:
                runner.stats.kv_load_failures += 1
                logger.error(
                    "%s request %s: the prefill reported write_failed for transfer %s: "
                    "finished with an error (kv_load_failure_policy fail)",
                    runner.tag,
                    req.engine_id,
                    tid,
                )
                queue.put_nowait(KV_LOAD_FAILED)
                return
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
