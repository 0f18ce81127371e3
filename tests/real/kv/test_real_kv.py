"""KV really moves: the proxy between two vLLM engines that run vLLM's own MoRIIOConnector.

Each test runs in both transfer modes (READ, then WRITE: tests/real/kv/conftest.py). The
reference answer comes from the prefill engine asked directly: a kv_producer computes a
plain request entirely by itself. The decode engine is not a reference in READ mode: a
READ consumer counts every prompt as loaded from a peer, KV or not
(``test_plain_request_to_the_decode_engine``).

Evidence that KV moved for a request, beyond equal text: the mori.io double logs every
transfer it posts, and the byte count must be every layer's blocks of that prompt; the
decode engine's ``vllm:prompt_tokens_by_source_total{source="external_kv_transfer"}``
grows by the tokens the connector loaded; and corrupting the bytes in flight changes the
answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from typing import Any

import aiohttp
import pytest

from tests.harness import read_sse, running_proxy
from tests.real.engines import REQUIRED
from tests.real.kv.conftest import (
    ENGINE_DEATH,
    KvStack,
    expected_bytes,
    external_tokens,
    fault,
    kv_missing_reason,
)

if kv_missing_reason() is not None and not REQUIRED:
    pytest.skip(kv_missing_reason() or "", allow_module_level=True)

# The proxy of a pair serves all its tests from the package's event loop.
pytestmark = [pytest.mark.real_vllm, pytest.mark.asyncio(loop_scope="package")]

WORDS = (
    "the quick brown fox jumps over the lazy dog while a prefill instance computes the "
    "prompt and a decode instance generates every token of the answer one at a time"
)


def prompt(kv: KvStack, tag: str, repeat: int = 2) -> str:
    """A prompt no other test shares a first block with (the decode engine caches
    prefixes, and a prefix hit would shrink the transfer)."""
    return f"{kv.mode} {tag}: " + " ".join([WORDS] * repeat)


async def post(
    url: str, body: dict[str, Any], headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    """(status, parsed JSON or the list of SSE payloads)."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, json=body, headers=headers or {}) as resp,
    ):
        if resp.headers.get("Content-Type", "").startswith("text/event-stream"):
            return resp.status, await read_sse(resp)
        return resp.status, json.loads(await resp.text())


def text(answer: Any) -> str:
    if isinstance(answer, list):  # SSE: every chunk but [DONE]
        return "".join(
            choice.get("text") or (choice.get("delta") or {}).get("content") or ""
            for chunk in answer[:-1]
            for choice in chunk["choices"]
        )
    choice = answer["choices"][0]
    return str(choice["text"] if "text" in choice else choice["message"]["content"])


def prompt_tokens(answer: Any) -> int:
    usage = answer[-2]["usage"] if isinstance(answer, list) else answer["usage"]
    return int(usage["prompt_tokens"])


async def reference(kv: KvStack, path: str, body: dict[str, Any]) -> Any:
    status, answer = await post(kv.prefill.url + path, body)
    assert status == 200, answer
    return answer


async def wait_metric(kv: KvStack, target: float) -> float:
    """vLLM updates its counters as it processes outputs: wait for them, don't sleep."""
    # On timeout, the caller's equality check says what the counter reached.
    with contextlib.suppress(AssertionError):
        await kv.proxy.wait_for(lambda: external_tokens(kv.decode) >= target, timeout=20)
    return external_tokens(kv.decode)


def loaded_tokens(kv: KvStack, prompt_tokens: int) -> int:
    """Prompt tokens the consumer takes from the producer: READ recomputes the last one."""
    return prompt_tokens - 1 if kv.mode == "READ" else prompt_tokens


async def check_kv_moved(kv: KvStack, path: str, body: dict[str, Any]) -> Any:
    """One request through the proxy: 200, the reference's text and usage, and the KV of
    its prompt moved by the double, once per layer, as the decode engine accounts it."""
    marks = kv.log_marks()
    before = external_tokens(kv.decode)
    status, answer = await post(kv.proxy.url + path, body)
    assert status == 200, answer
    expected = await reference(kv, path, body)
    assert text(answer) == text(expected) and text(answer).strip(), (answer, expected)
    tokens = prompt_tokens(answer)
    assert tokens == prompt_tokens(expected)
    transfers = kv.transfers_since(marks)
    op = "read" if kv.mode == "READ" else "write"
    assert [t[0] for t in transfers] == [op, op], transfers  # one per layer (2 layers)
    assert sum(t[2] for t in transfers) == expected_bytes(tokens), transfers
    after = await wait_metric(kv, before + loaded_tokens(kv, tokens))
    assert after - before == loaded_tokens(kv, tokens)
    return answer


# ---------------------------------------------------------------------------- tests


async def test_registered_by_vllms_own_heartbeat(kv: KvStack) -> None:
    """Both instances reached the proxy by the connector's heartbeat child, as announced
    by the engines themselves: HTTP address, MoRI-IO ports, sizes, the mode in force."""
    by_role = {i.role: i for i in kv.instances()}
    for role, engine in (("P", kv.prefill), ("D", kv.decode)):
        handshake, notify = kv.pair.kv_ports(engine.name)
        instance = by_role[role]  # type: ignore[index]
        assert instance.http_address == engine.address
        assert (instance.kv_host, instance.handshake_port, instance.notify_port) == (
            "127.0.0.1",
            handshake,
            notify,
        )
        assert (instance.dp_size, instance.tp_size) == (1, 1)
        assert instance.transfer_mode == kv.mode


async def test_completion_moves_the_kv(kv: KvStack) -> None:
    """Three blocks of prompt: the decode engine answers from the prefill engine's KV."""
    body = {"model": "tiny", "prompt": prompt(kv, "completion", 3), "max_tokens": 16}
    answer = await check_kv_moved(kv, "/v1/completions", dict(body, temperature=0))
    assert answer["choices"][0]["finish_reason"] == "length"
    assert answer["usage"]["completion_tokens"] == 16
    assert prompt_tokens(answer) > 2 * 32  # more than two blocks moved


async def test_streaming_and_chat_move_the_kv(kv: KvStack) -> None:
    stream = {"stream": True, "stream_options": {"include_usage": True}}
    completion = {"model": "tiny", "prompt": prompt(kv, "stream"), "max_tokens": 12}
    await check_kv_moved(kv, "/v1/completions", dict(completion, temperature=0, **stream))
    messages = [{"role": "user", "content": prompt(kv, "chat")}]
    chat = {"model": "tiny", "messages": messages, "max_tokens": 10, "temperature": 0}
    await check_kv_moved(kv, "/v1/chat/completions", chat)
    messages = [{"role": "user", "content": prompt(kv, "chat stream")}]
    await check_kv_moved(kv, "/v1/chat/completions", dict(chat, messages=messages, **stream))


async def test_concurrent_requests_each_get_their_own_kv(kv: KvStack) -> None:
    """Batched on both engines: every answer is its own prompt's, with its own blocks."""
    bodies = [
        {"model": "tiny", "prompt": prompt(kv, f"batch {i}"), "max_tokens": 8, "temperature": 0}
        for i in range(4)
    ]
    marks = kv.log_marks()
    answers = await asyncio.gather(*(post(kv.proxy.url + "/v1/completions", b) for b in bodies))
    total = 0
    for body, (status, answer) in zip(bodies, answers, strict=True):
        assert status == 200, answer
        expected = await reference(kv, "/v1/completions", body)
        assert text(answer) == text(expected)
        total += expected_bytes(prompt_tokens(answer))
    transfers = kv.transfers_since(marks)
    assert len(transfers) == 2 * len(bodies) and sum(t[2] for t in transfers) == total


async def test_corrupted_transfer_changes_the_output(kv: KvStack) -> None:
    """The equality above can fail: the double flips a bit of every byte it serves (READ:
    the prefill engine's KV on its way out; WRITE: on its way into the decode engine),
    and the answer changes. Without the fault the next request is right again. The
    prompt stays under one block, so the decode engine caches nothing corrupt."""
    body = {"model": "tiny", "prompt": f"{kv.mode} flip: the lazy dog", "max_tokens": 16}
    body["temperature"] = 0
    expected = await reference(kv, "/v1/completions", body)
    marks = kv.log_marks()
    with fault(kv.pair, kv.pair.target, "flip"):
        status, answer = await post(kv.proxy.url + "/v1/completions", body)
    assert status == 200, answer
    assert kv.transfers_since(marks), "no transfer happened"
    assert text(answer) != text(expected), "corrupt KV gave the right text: the check is blind"
    healthy = dict(body, prompt=f"{kv.mode} no flip: the lazy dog")
    await check_kv_moved(kv, "/v1/completions", healthy)


async def test_plain_request_to_the_decode_engine(kv: KvStack) -> None:
    """What a decode engine does with a request that has no kv_transfer_params (the proxy
    never sends one). READ: vLLM 0.32's consumer still counts all but the last prompt
    token as loaded (get_num_new_matched_tokens does not look at the params) and loads
    nothing, so the text is wrong: the tier's right answers come from moved KV, not from
    a decode engine recomputing the prompt. WRITE: it computes the prompt itself."""
    body = {"model": "tiny", "prompt": f"{kv.mode} plain: the quick brown fox", "max_tokens": 16}
    body["temperature"] = 0
    expected = await reference(kv, "/v1/completions", body)
    marks, before = kv.log_marks(), external_tokens(kv.decode)
    status, answer = await post(kv.decode.url + "/v1/completions", body)
    assert status == 200, answer
    assert kv.transfers_since(marks) == []
    if kv.mode == "READ":
        tokens = prompt_tokens(answer)
        assert await wait_metric(kv, before + tokens - 1) - before == tokens - 1
        assert text(answer) != text(expected)
    else:
        assert text(answer) == text(expected)
        assert external_tokens(kv.decode) == before


async def test_a_failed_transfer_is_an_error_not_wrong_text(kv: KvStack) -> None:
    """The double refuses the transfer (ERR_RDMA_OP): the client gets an error, never
    text made without the prompt's KV.

    READ: the consumer's connector reports a KV load failure, vLLM fails the request
    (kv_load_failure_policy "fail") and the proxy answers 502; both engines live on.

    WRITE, two outcomes, by a race inside vLLM 0.32. If the producer posted both layers'
    writes before its forward ended, ``wait_for_save`` -> ``seal_pending_transfers``
    waits for them on the model thread, the TransferError escapes and the producer's
    engine dies: its leg fails and the proxy answers 502. Otherwise its write thread
    catches the error ("write task failed") and the consumer, which has no timeout for
    KV in 0.32, would wait forever: a proxy with a 5 s decode timeout answers 504."""
    body = {"model": "tiny", "prompt": f"{kv.mode} fail: the lazy dog", "max_tokens": 8}
    marks = kv.log_marks()
    if kv.mode == "READ":
        with fault(kv.pair, kv.pair.target, "fail"):
            status, answer = await post(kv.proxy.url + "/v1/completions", body)
        assert status == 502, answer
        assert "decode" in answer["error"]["message"]
        log = kv.decode.log_text()[marks["decode"] :]
        assert "Failing 1 request(s) due to KV load failure" in log, kv.decode.tail()
    else:
        async with running_proxy(
            static_instances=kv.instances(), decode_first_byte_timeout=5.0, max_retries=0
        ) as impatient:
            with fault(kv.pair, kv.pair.target, "fail"):
                status, answer = await post(impatient.url + "/v1/completions", body)
        if status == 502:  # the producer died of it
            assert "prefill" in answer["error"]["message"], answer
            kv.killed.add("prefill")
            await kv.proxy.wait_for(lambda: ENGINE_DEATH in kv.prefill.log_text(), timeout=30)
            log = kv.prefill.log_text()[marks["prefill"] :]
            assert "in seal_pending_transfers" in log, kv.prefill.tail(80)
        else:
            assert status == 504, answer
            log = kv.prefill.log_text()[marks["prefill"] :]
            assert "write task failed" in log.lower(), kv.prefill.tail()
    assert "refused: ERR_RDMA_OP injected failure" in kv.pair.initiator.log_text()


async def test_a_malformed_leg_kills_the_engine(kv: KvStack) -> None:
    """Why the proxy's legs must be exact (docs/protocol.md §5, §6): the connector's scheduler code
    raises on a malformed leg, and the whole engine dies. READ: a decode leg whose
    remote_block_ids lost a level of nesting; WRITE: a prefill leg without the
    remote_block_ids key. The same request through the proxy first: served. Runs last in
    its mode; a later test would get a fresh pair (KvPair.ensure_running)."""
    body = {"model": "tiny", "prompt": f"{kv.mode} malformed: the dog", "max_tokens": 4}
    status, answer = await post(kv.proxy.url + "/v1/completions", body)
    assert status == 200, answer
    p_handshake, p_notify = kv.pair.kv_ports("prefill")
    d_handshake, d_notify = kv.pair.kv_ports("decode")
    request_id = (
        f"___prefill_addr_host:127.0.0.1,handshake:{p_handshake},notify:{p_notify}"
        f"___decode_addr_host:127.0.0.1,handshake:{d_handshake},notify:{d_notify}"
        f"_{uuid.uuid4().hex}"
    )
    params: dict[str, Any] = {"transfer_id": f"tx-{uuid.uuid4().hex}", "tp_size": 1}
    if kv.mode == "READ":
        victim, error, frame = (
            kv.decode,
            "TypeError: object of type 'int' has no len()",
            ("in _align_read_blocks"),
        )
        params.update(
            do_remote_prefill=True,
            do_remote_decode=False,
            remote_block_ids=[0, 1],  # flattened: the producer returns [[0, 1]]
            remote_engine_id=f"127.0.0.1:{p_handshake}",
            remote_host="127.0.0.1",
            remote_handshake_port=str(p_handshake),
            remote_notify_port=str(p_notify),
        )
    else:
        victim, error, frame = kv.prefill, "KeyError: 'remote_block_ids'", "in add_new_req"
        params.update(
            do_remote_decode=True,
            do_remote_prefill=False,
            remote_host="127.0.0.1",
            remote_handshake_port=d_handshake,
            remote_notify_port=d_notify,
        )  # and no remote_engine_id / remote_block_ids keys
        body.update(max_tokens=1, min_tokens=1)
    kv.killed.add(victim.name)
    status, answer = await post(
        victim.url + "/v1/completions",
        dict(body, kv_transfer_params=params),
        {"X-Request-Id": request_id},
    )
    assert status == 500 and "EngineCore encountered an issue" in answer["error"]["message"]
    await kv.proxy.wait_for(lambda: not victim.alive(), timeout=60)  # the API server exits
    log = victim.log_text()
    assert error in log and frame in log, victim.tail(60)
