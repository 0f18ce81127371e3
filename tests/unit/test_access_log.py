"""The access-log line: its fields in text and JSON, and nothing formatted when info is off."""

from __future__ import annotations

import json
import logging

import pytest

from moriio_proxy.access_log import LOGGER, AccessLog, fields
from moriio_proxy.record import RequestRecord

PAIR = ("READ", "10.0.0.1:8100", 1, "10.0.0.2:8200")


def served() -> RequestRecord:
    record = RequestRecord("chat", "client-42", 10.0)
    record.stream = True
    record.mode, record.prefill, record.rank, record.decode = PAIR
    record.attempts, record.status, record.outcome = 2, 200, "ok"
    record.prefill_seconds, record.decode_first_byte = 0.02, 0.03
    record.first_byte, record.last_chunk, record.ended, record.chunks = 10.1, 10.5, 10.5, 9
    return record


EXPECTED = {
    "request_id": "client-42",
    "endpoint": "chat",
    "status": 200,
    "outcome": "ok",
    "mode": "READ",
    "prefill": "10.0.0.1:8100",
    "dp_rank": 1,
    "decode": "10.0.0.2:8200",
    "attempts": 2,
    "stream": True,
    "chunks": 9,
    "prefill_s": 0.02,
    "decode_first_byte_s": 0.03,
    "ttft_s": 0.1,
    "total_s": 0.5,
}


def test_the_fields_name_the_request_the_pair_and_the_phases():
    assert fields(served()) == EXPECTED


def test_a_request_refused_before_routing_has_no_pair_fields():
    record = RequestRecord("completions", "abc", 1.0)
    record.status, record.outcome, record.ended = 429, "over_capacity", 1.5
    assert fields(record) == {
        "request_id": "abc",
        "endpoint": "completions",
        "status": 429,
        "outcome": "over_capacity",
        "mode": "none",
        "attempts": 0,
        "stream": False,
        "total_s": 0.5,
    }


def test_text_is_key_value_pairs_in_field_order(caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger=LOGGER)
    AccessLog("text").write(served())
    [line] = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert line == (
        "request_id=client-42 endpoint=chat status=200 outcome=ok mode=READ "
        "prefill=10.0.0.1:8100 dp_rank=1 decode=10.0.0.2:8200 attempts=2 stream=yes "
        "chunks=9 prefill_s=0.02 decode_first_byte_s=0.03 ttft_s=0.1 total_s=0.5"
    )


def test_a_text_value_with_spaces_is_quoted(caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger=LOGGER)
    record = served()
    record.request_id = "a b"  # not what client_id lets through; the format still holds
    AccessLog("text").write(record)
    [line] = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert line.startswith('request_id="a b" endpoint=chat')


def test_json_is_one_object_with_the_same_fields(caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger=LOGGER)
    AccessLog("json").write(served())
    [line] = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert json.loads(line) == EXPECTED


def test_nothing_is_formatted_when_info_is_off(monkeypatch: pytest.MonkeyPatch):
    logger = logging.getLogger("tests.access_log.off")
    logger.setLevel(logging.WARNING)
    log = AccessLog("json", logger)

    def formatted(_: RequestRecord) -> dict:
        raise AssertionError("the line was built although nobody logs it")

    monkeypatch.setattr("moriio_proxy.access_log.fields", formatted)
    log.write(served())  # no AssertionError: fields() was never called
    logger.setLevel(logging.INFO)
    with pytest.raises(AssertionError):
        log.write(served())
