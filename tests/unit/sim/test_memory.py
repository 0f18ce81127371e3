"""A DP rank's KV memory: held blocks, reuse of a transfer id, defer-timeout reaping."""

from __future__ import annotations

import asyncio

from moriio_proxy.sim.engine.memory import BlockAllocator, DpRank, Registration
from tests.harness.waiting import STATE_TIMEOUT


def test_blocks_are_unique_across_ranks_and_sized_by_block_size() -> None:
    blocks = BlockAllocator(block_size=4)
    a, b = DpRank(0, blocks), DpRank(1, blocks)
    assert a.hold("t1", 9).block_ids == [1, 2, 3]
    assert b.hold("t1", 1).block_ids == [4]  # same id on another rank: its own memory
    assert blocks.allocate(0) == [5]  # even an empty prompt takes a block


def test_only_computed_blocks_answer_a_read() -> None:
    st = DpRank(0, BlockAllocator(16))
    reg = st.hold("t", 20)
    assert st.computed_kv(reg.block_ids) is None  # the prefill has not run yet
    reg.fingerprint = "fp"
    assert st.computed_kv(reg.block_ids) == "fp"
    assert st.computed_kv([reg.block_ids[0]]) is None  # ids must match exactly


def test_reused_transfer_id_frees_the_old_blocks() -> None:
    st = DpRank(0, BlockAllocator(16))
    old = st.hold("t", 4)
    new = st.hold("t", 4)
    assert not st.holds(old) and st.holds(new) and len(st.registrations) == 1
    st.free("t")
    st.free("t")  # idempotent
    assert not st.registrations


async def test_defer_timeout_reaps_only_the_live_registration() -> None:
    st = DpRank(0, BlockAllocator(16))
    reaped: list[Registration] = []
    done = asyncio.Event()

    def on_reaped(reg: Registration) -> None:
        reaped.append(reg)
        done.set()

    reg = st.hold("t", 4)
    st.free_later(reg, 0.01, on_reaped)
    released = st.hold("u", 4)
    st.free_later(released, 0.01, on_reaped)
    st.free("u")  # released in time: its timer is cancelled
    assert released.timer is not None and released.timer.cancelled()
    await asyncio.wait_for(done.wait(), STATE_TIMEOUT)
    assert reaped == [reg] and not st.registrations


def test_finished_transfer_ids_are_remembered_boundedly() -> None:
    st = DpRank(0, BlockAllocator(16))
    for i in range(10_005):
        st.mark_terminal(i)
    st.mark_terminal(5)  # seen again: most recent
    assert len(st.terminal) == 10_000
    assert 4 not in st.terminal and 5 in st.terminal and next(iter(st.terminal)) == 6
