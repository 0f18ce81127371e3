"""The prefix index behind cache-aware routing: matching, LRU eviction, memory bound."""

from __future__ import annotations

import pytest

from moriio_proxy.policies.prefix_index import PrefixIndex

BLOCK = 8


def index(max_blocks: int = 1000) -> PrefixIndex[str]:
    return PrefixIndex(BLOCK, max_blocks)


def text(*blocks: str) -> str:
    """Whole blocks of BLOCK characters, each made of one repeated letter or word."""
    return "".join((b * BLOCK)[:BLOCK] for b in blocks)


def test_hashes_cover_full_blocks_only_and_chain():
    idx = index()
    assert idx.hashes("") == []
    assert idx.hashes("x" * (BLOCK - 1)) == []
    assert len(idx.hashes("x" * (3 * BLOCK + 5))) == 3
    # Chained: the same block after different prefixes has different keys.
    ab, cb = idx.hashes(text("a", "b")), idx.hashes(text("c", "b"))
    assert ab[1] != cb[1]
    # A prefix's keys are the start of the longer text's keys.
    assert idx.hashes(text("a", "b", "c"))[:2] == ab
    # Token bytes never collide with text of the same characters.
    assert idx.hashes(text("a").encode()) != idx.hashes(text("a"))


def test_match_finds_the_longest_prefix_and_its_holders():
    idx = index()
    idx.record(idx.hashes(text("s", "a", "a")), "A")
    idx.record(idx.hashes(text("s", "b")), "B")
    everyone = idx.bit("A") | idx.bit("B")
    depth, holders = idx.match(idx.hashes(text("s", "a", "a", "x")), everyone)
    assert depth == 3 and list(idx.owners(holders)) == ["A"]
    depth, holders = idx.match(idx.hashes(text("s", "b", "z")), everyone)
    assert depth == 2 and list(idx.owners(holders)) == ["B"]
    # Only the shared first block: both hold it.
    depth, holders = idx.match(idx.hashes(text("s", "q")), everyone)
    assert depth == 1 and set(idx.owners(holders)) == {"A", "B"}
    assert idx.match(idx.hashes(text("q")), everyone) == (0, 0)


def test_match_only_counts_allowed_targets():
    idx = index()
    idx.record(idx.hashes(text("a", "b")), "A")
    idx.record(idx.hashes(text("a")), "B")
    depth, holders = idx.match(idx.hashes(text("a", "b")), idx.bit("B"))
    assert depth == 1 and list(idx.owners(holders)) == ["B"]
    assert idx.match(idx.hashes(text("a", "b")), idx.bit("C")) == (0, 0)


def test_the_memory_bound_holds_and_least_recent_prompts_go_first():
    idx = index(max_blocks=6)
    old, mid, new = text("o", "o", "o"), text("m", "m"), text("n", "n", "n")
    idx.record(idx.hashes(old), "A")
    idx.record(idx.hashes(mid), "A")
    idx.record(idx.hashes(old), "A")  # used again: now more recent than mid
    idx.record(idx.hashes(new), "A")
    assert len(idx) == 6
    allowed = idx.bit("A")
    assert idx.match(idx.hashes(mid), allowed) == (0, 0)  # evicted whole
    assert idx.match(idx.hashes(old), allowed)[0] == 3
    assert idx.match(idx.hashes(new), allowed)[0] == 3


def test_a_prompt_loses_its_tail_before_its_head():
    # As in vLLM: eviction takes the last blocks of a prefix first, so what is left of
    # an old prompt is still a usable prefix.
    idx = index(max_blocks=5)
    idx.record(idx.hashes(text("a", "b", "c", "d")), "A")
    idx.record(idx.hashes(text("x", "y", "z")), "A")  # needs 2 of a-b-c-d's blocks
    assert len(idx) == 5
    assert idx.match(idx.hashes(text("a", "b", "c", "d")), idx.bit("A"))[0] == 2


def test_a_prompt_longer_than_the_bound_keeps_its_head():
    idx = index(max_blocks=3)
    idx.record(idx.hashes(text(*"abcdefgh")), "A")
    assert len(idx) == 3
    assert idx.match(idx.hashes(text(*"abcdefgh")), idx.bit("A"))[0] == 3


def test_the_bound_holds_under_many_distinct_prompts():
    idx = index(max_blocks=100)
    for n in range(500):
        idx.record(idx.hashes(f"{n:08d}" * 4), f"T{n % 3}")
        assert len(idx) <= 100
    assert len(idx) == 100


def test_drop_clears_a_target_everywhere_and_reuses_its_bit():
    idx = index()
    shared, only_a = text("s", "s"), text("a", "a")
    idx.record(idx.hashes(shared), "A")
    idx.record(idx.hashes(shared), "B")
    idx.record(idx.hashes(only_a), "A")
    bit_a = idx.bit("A")
    idx.drop(["A"])
    assert len(idx) == 2  # only_a's blocks had no other holder: gone
    assert "A" not in idx.targets()
    assert idx.bit("C") == bit_a  # the freed bit, with none of A's history
    depth, holders = idx.match(idx.hashes(shared), idx.bit("B") | idx.bit("C"))
    assert depth == 2 and list(idx.owners(holders)) == ["B"]
    assert idx.match(idx.hashes(only_a), idx.bit("C")) == (0, 0)
    idx.drop(["nobody"])  # unknown targets are ignored
    assert len(idx) == 2


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError):
        PrefixIndex(0, 10)
    with pytest.raises(ValueError):
        PrefixIndex(8, 0)
