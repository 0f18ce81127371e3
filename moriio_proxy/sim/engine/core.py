"""The simulated EngineCore: runs engine requests on DP ranks and dies the way vLLM's does.

Each engine request takes one connector path (plain, prefill leg, READ or WRITE decode leg).
A connector rule that raises inside the real EngineCore (``EngineCoreFatal``) kills this one:
every in-flight request fails, the instance stops answering and stops heartbeating, which
is what a proxy meets when it sends a malformed leg to real vLLM 0.32.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from ..connector import (
    EngineCoreFatal,
    external_prompt_tokens,
    leg_kind,
    notify_kind,
    prefill_answer,
    write_destination,
)
from ..model import kv_fingerprint
from ..settings import SimConfig, SimStats
from ..transport import NotifyListenerDied, Transport
from .memory import BlockAllocator, DpRank, Registration
from .prefix_cache import PrefixCache
from .read import ReadTransfers
from .request import ENGINE_DEAD, EngineRequest, OutputQueue, StreamSignal
from .runner import ModelRunner
from .write import WriteTransfers

logger = logging.getLogger(__name__)


class EngineCore:
    """All DP ranks of one instance, their request tasks, and the engine's life and death."""

    def __init__(
        self,
        config: SimConfig,
        stats: SimStats,
        transport: Transport,
        tag: str,
        on_death: Callable[[], None],
    ) -> None:
        self.config = config
        self.stats = stats
        self.tag = tag
        self.dead_reason: str | None = None
        #: Output queues of the HTTP requests in flight (a death or shutdown is broadcast).
        self.streams: set[OutputQueue] = set()
        self._transport = transport
        self._on_death = on_death
        self._dead = asyncio.Event()
        self._requests: set[asyncio.Task[None]] = set()
        self._background: set[asyncio.Task[Any]] = set()
        self._rr = 0
        blocks = BlockAllocator(config.block_size)
        self.ranks = [
            DpRank(r, blocks, tag, self._prefix_cache(config)) for r in range(config.dp_size)
        ]
        self.runner = ModelRunner(config, stats, tag, self.ranks)
        self.reads = ReadTransfers(self.runner, transport, self.spawn)
        self.writes = WriteTransfers(self.runner, transport, self.ranks, self.spawn)

    @staticmethod
    def _prefix_cache(config: SimConfig) -> PrefixCache | None:
        if not config.enable_prefix_caching:
            return None
        return PrefixCache(config.block_size, config.num_gpu_blocks)

    def cached_blocks(self) -> list[int]:
        """Blocks in each DP rank's prefix cache."""
        return [len(st.cache) if st.cache is not None else 0 for st in self.ranks]

    def held_transfers(self) -> int:
        """KV registrations P still holds (blocks not yet read/written/released/reaped)."""
        return sum(len(st.registrations) for st in self.ranks)

    def pending_kv_waiters(self) -> int:
        """D, WRITE: decode requests currently waiting for a KV write."""
        return sum(len(st.write_waiters) for st in self.ranks)

    def pick_rank(self) -> int:
        """The engine's own DP load balancing when no X-data-parallel-rank pins a rank."""
        r = self._rr % self.config.dp_size
        self._rr += 1
        return r

    def open_stream(self) -> OutputQueue:
        queue: OutputQueue = asyncio.Queue()
        self.streams.add(queue)
        return queue

    def close_stream(self, queue: OutputQueue) -> None:
        self.streams.discard(queue)

    def broadcast(self, signal: StreamSignal) -> None:
        for queue in list(self.streams):
            queue.put_nowait(signal)

    def submit(self, req: EngineRequest, queue: OutputQueue) -> asyncio.Task[None]:
        """Start an engine request; its tokens go to ``queue``."""
        task = asyncio.ensure_future(self._run(req, queue))
        self._requests.add(task)
        task.add_done_callback(self._requests.discard)
        return task

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """A background task owned by the engine (cancelled by ``stop``)."""
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def wait_dead(self) -> str:
        await self._dead.wait()
        return self.dead_reason or ""

    def die(self, reason: str) -> None:
        """EngineCore died: fail in-flight requests, then let the instance go silent.

        vLLM's API server exits when EngineCore dies, so the instance stops heartbeating and
        accepting connections (``on_death``); in-flight requests get a 500 (or an SSE error).
        """
        if self.dead_reason is not None:
            return
        self.dead_reason = reason
        logger.error("%s EngineCore died: %s", self.tag, reason)
        self._dead.set()
        self.broadcast(ENGINE_DEAD)
        current = asyncio.current_task()
        for t in list(self._requests):
            if t is not current:
                t.cancel()
        self._on_death()

    async def stop(self) -> None:
        """Cancel every request and background task, timer and waiter."""
        tasks = [*self._requests, *self._background]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for st in self.ranks:
            st.close()

    async def _run(self, req: EngineRequest, queue: OutputQueue) -> None:
        self.stats.per_rank[req.rank] = self.stats.per_rank.get(req.rank, 0) + 1
        try:
            kind = leg_kind(self.config.role, req.kv)
            if kind == "prefill":
                await self._prefill(req, queue)
            elif kind == "decode" and self.config.mode == "READ":
                await self.reads.decode(req, queue)
            elif kind == "decode":
                await self.writes.decode(req, queue)
            else:
                await self._plain(req, queue)
        except EngineCoreFatal as e:
            self.die(str(e))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            logger.exception("%s simulator bug", self.tag)
            self.die(f"simulator internal error: {e!r}")

    async def _plain(self, req: EngineRequest, queue: OutputQueue) -> None:
        """No transfer, though a READ-mode consumer still counts the prompt as external
        (``external_prompt_tokens``): those tokens are never computed, the answer is garbage.
        """
        cfg, runner = self.config, self.runner
        await runner.compute_prompt(req)
        if req.kv and cfg.role == "D" and req.kv.get("do_remote_decode"):
            logger.warning("%s a prefill leg (do_remote_decode) was sent to a consumer", self.tag)
        claimed = external_prompt_tokens(
            cfg.role, cfg.mode, len(req.words), remote_prefill=False, version=cfg.vllm_version
        )
        if claimed > 0:
            why = "request without KV to a READ-mode consumer"
            plan = runner.plan(req, runner.garbage(req, why), garbage=True)
        else:
            plan = runner.plan(req, kv_fingerprint(req.text))
        await runner.emit(req, plan, queue)

    async def _prefill(self, req: EngineRequest, queue: OutputQueue) -> None:
        """P with do_remote_decode: compute the KV, hold the blocks, answer with params.

        The blocks stay held after the answer until the decode reads (READ) or is written to
        (WRITE), releases them, or ``defer_timeout`` reaps them.
        """
        assert req.kv is not None
        kv = req.kv
        st = self.ranks[req.rank]
        tid = req.adopt_transfer_id()
        dest = write_destination(req.engine_id, kv) if self.config.mode == "WRITE" else None
        reg = st.hold(tid, len(req.words))
        returned = False
        try:
            await self.runner.compute_prompt(req)
            fingerprint = kv_fingerprint(req.text)
            reg.fingerprint = fingerprint
            if dest is not None:
                self.writes.prefilled(st, kv["transfer_id"], tid, fingerprint, dest)
            plan = self.runner.plan(req, fingerprint)

            def on_finish() -> dict[str, Any] | None:
                nonlocal returned
                returned = True
                if not plan.length_capped:  # request_finished: (False, None), blocks freed
                    if st.holds(reg):
                        st.free(tid)
                    return None
                if st.holds(reg):
                    st.free_later(reg, self.config.defer_timeout, self._reaped(st))
                params = prefill_answer(
                    self._transport.advertised, req.rank, reg.block_ids, kv["transfer_id"]
                )
                if plan.n_tokens == 1:
                    # 0.32's scheduler: a request finishing on its first output tells D
                    # its cache hits, which D reports instead of its own (all external).
                    params["remote_prefill_cached_tokens"] = req.cached_tokens
                return params

            await self.runner.emit(req, plan, queue, on_finish)
        finally:
            if not returned and st.holds(reg):
                st.free(tid)  # aborted: request_finished frees now

    def _reaped(self, st: DpRank) -> Callable[[Registration], None]:
        def reaped(reg: Registration) -> None:
            self.stats.blocks_reaped += 1
            logger.warning(
                "%s rank %d: transfer %s not taken within defer_timeout=%.1fs; blocks %s freed",
                self.tag,
                st.rank,
                reg.transfer_id,
                self.config.defer_timeout,
                reg.block_ids,
            )

        return reaped

    def on_notify(self, rank: int, message: dict[str, Any]) -> dict[str, Any] | None:
        """Route a notify message on DP rank ``rank``; returns the reply, if any.

        A message this role must never get kills the rank's listener (NotifyListenerDied),
        as an assertion does in 0.32's listener thread.
        """
        st = self.ranks[rank]
        kind = notify_kind(message)
        role = self.config.role
        if kind == "remote_blocks":  # D -> P (WRITE): "my blocks are ready, write there"
            if role != "P":
                raise NotifyListenerDied("only prefill can get block messages (AssertionError)")
            blocks = message.get("block_notify_list") or []
            if not blocks:
                raise NotifyListenerDied(
                    "block_notify_list cannot be empty in remote allocate message"
                )
            self.writes.blocks_ready(st, message, blocks)
            return None
        if kind == "write_done":  # P -> D (WRITE): the KV is in your blocks
            if role != "D":
                raise NotifyListenerDied("only decode can get WRITE completion messages")
            self.writes.written(st, message)
            return None
        if kind == "write_failed":  # P -> D (WRITE, 0.33): that KV will never be written
            if role != "D":
                raise NotifyListenerDied("only decode can get WRITE failure messages")
            self.writes.failed(st, message)  # a 0.32 decode's listener dies here
            return None
        if kind == "release":  # D -> P: done with the KV (or never needed it)
            if role != "P":
                raise NotifyListenerDied("only prefill can get transfer release messages")
            tid = message.get("transfer_id")
            st.mark_terminal(tid)
            st.remote_alloc.pop(tid, None)
            st.free(tid)
            return None
        if kind == "sim_read":  # D -> P (READ): stands in for the RDMA read of block ids
            return self.reads.serve(st, message)
        logger.warning("%s rank %d: unhandled notify type %r", self.tag, rank, kind)
        return None
