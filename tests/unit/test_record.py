"""RequestRecord's derived values: the phase timings it reports and a stream's rate."""

from __future__ import annotations

from moriio_proxy.record import NO_MODE, RequestRecord


def test_a_fresh_record_has_no_phases_and_no_pair():
    record = RequestRecord("chat", "client-1", 100.0)
    assert record.phases() == {}
    assert (record.mode, record.prefill, record.decode, record.attempts) == (NO_MODE, None, None, 0)
    assert record.chunk_rate() is None


def test_phases_are_durations_or_times_since_arrival():
    record = RequestRecord("completions", "r", 100.0)
    record.prefill_seconds = 0.01234567
    record.decode_first_byte = 0.5
    record.first_byte = 100.75
    record.ended = 102.0
    assert record.phases() == {
        "prefill_s": 0.0123,
        "decode_first_byte_s": 0.5,
        "ttft_s": 0.75,
        "total_s": 2.0,
    }


def test_chunk_rate_counts_the_events_after_the_first_over_their_spread():
    record = RequestRecord("completions", "r", 0.0)
    record.first_byte, record.last_chunk, record.chunks = 1.0, 3.0, 11
    assert record.chunk_rate() == 5.0
    record.chunks = 1
    assert record.chunk_rate() is None  # one event has no rate
    record.chunks, record.last_chunk = 4, 1.0
    assert record.chunk_rate() is None  # all in one write: no spread to divide by
