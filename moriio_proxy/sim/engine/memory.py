"""Each DP rank's KV memory: blocks held for transfers, their defer timers, and the
bookkeeping of the WRITE path (pending writes, announced decode blocks, finished ids).

A KV read addresses block ids in ONE rank's memory, so every DP rank keeps its own; a
transfer that lands on the wrong rank finds nothing there, as on hardware. Each rank has
its own prefix cache and its own compute schedule too: a prompt computed on rank 0 is no
hit on rank 1.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..connector import WriteDestination
from .prefix_cache import PrefixCache

logger = logging.getLogger(__name__)

_MAX_TERMINAL_TRANSFERS = 10_000  # bound on remembered finished transfer ids per rank


class BlockAllocator:
    """Hands out KV block ids, unique across the instance (ids are never reused)."""

    def __init__(self, block_size: int) -> None:
        self._block_size = block_size
        self._next = 1

    def allocate(self, n_tokens: int) -> list[int]:
        n = max(1, math.ceil(n_tokens / self._block_size))
        ids = list(range(self._next, self._next + n))
        self._next += n
        return ids


@dataclass
class Registration:
    """KV blocks a prefill leg holds for a transfer until read/written/released/reaped."""

    transfer_id: Any
    block_ids: list[int]
    fingerprint: str | None = None  # None until the prefill has computed the KV
    timer: asyncio.TimerHandle | None = None


@dataclass
class WriteTask:
    """P, WRITE: KV waiting for the decode's "blocks ready" notify (0.32 MoRIIOWriter)."""

    key: Any  # kv_transfer_params["transfer_id"] as the writer sees it
    reg_key: Any  # the transfer id the scheduler mapped (frees the registration)
    fingerprint: str
    dest: WriteDestination
    timer: asyncio.TimerHandle | None = None


@dataclass
class RemoteAlloc:
    """P, WRITE: a decode's "remote_blocks" notify (0.32 RemoteAllocInfo)."""

    decode_rank: Any
    block_ids: list[Any]


@dataclass
class DpRank:
    """One DP rank's engine memory."""

    rank: int
    blocks: BlockAllocator
    tag: str = ""  # the instance's log prefix
    cache: PrefixCache | None = None  # None: prefix caching disabled
    compute_free_at: float = 0.0  # loop time at which the rank's queued prompts are computed
    registrations: dict[Any, Registration] = field(default_factory=dict)
    write_tasks: dict[Any, WriteTask] = field(default_factory=dict)
    remote_alloc: dict[Any, RemoteAlloc] = field(default_factory=dict)
    terminal: OrderedDict[Any, None] = field(default_factory=OrderedDict)
    write_waiters: dict[Any, asyncio.Future[Any]] = field(default_factory=dict)
    unmatched_writes: dict[Any, Any] = field(default_factory=dict)

    def hold(self, transfer_id: Any, n_tokens: int) -> Registration:
        """Allocate blocks for a prompt and hold them under ``transfer_id``.

        A reused id frees the blocks it held before (0.32 overwrites the mapping).
        """
        if transfer_id in self.registrations:
            logger.warning("%s rank %d: transfer_id %s reused", self.tag, self.rank, transfer_id)
            self.free(transfer_id)
        reg = Registration(transfer_id, self.blocks.allocate(n_tokens))
        self.registrations[transfer_id] = reg
        return reg

    def holds(self, reg: Registration) -> bool:
        """True while ``reg`` is still the live registration of its transfer id."""
        return self.registrations.get(reg.transfer_id) is reg

    def free(self, transfer_id: Any) -> None:
        reg = self.registrations.pop(transfer_id, None)
        if reg is not None and reg.timer is not None:
            reg.timer.cancel()

    def free_later(
        self, reg: Registration, timeout: float, on_reaped: Callable[[Registration], None]
    ) -> None:
        """0.32 request_finished: held blocks are force-freed after defer_timeout."""
        if reg.timer is not None:
            reg.timer.cancel()
        reg.timer = asyncio.get_running_loop().call_later(timeout, self._reap, reg, on_reaped)

    def _reap(self, reg: Registration, on_reaped: Callable[[Registration], None]) -> None:
        if self.holds(reg):
            del self.registrations[reg.transfer_id]
            on_reaped(reg)

    def computed_kv(self, block_ids: Any) -> str | None:
        """The KV fingerprint these exact block ids hold on this rank, if computed."""
        for reg in self.registrations.values():
            if reg.block_ids == block_ids and reg.fingerprint is not None:
                return reg.fingerprint
        return None

    def mark_terminal(self, transfer_id: Any) -> None:
        """Remember a finished transfer (late messages for it are ignored), boundedly."""
        self.terminal[transfer_id] = None
        self.terminal.move_to_end(transfer_id)
        while len(self.terminal) > _MAX_TERMINAL_TRANSFERS:
            self.terminal.popitem(last=False)

    def close(self) -> None:
        """Cancel every timer and waiter (the instance is stopping)."""
        for reg in self.registrations.values():
            if reg.timer is not None:
                reg.timer.cancel()
        for task in self.write_tasks.values():
            if task.timer is not None:
                task.timer.cancel()
        for fut in self.write_waiters.values():
            fut.cancel()
