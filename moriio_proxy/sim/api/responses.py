"""vLLM's answer shapes: the JSON body of a non-streaming request and the SSE stream of a
streaming one, built from the engine's token events.

The proxy relays these byte for byte, so field names, chunk order, where ``usage`` and
``kv_transfer_params`` appear, and how an engine death shows up mid-stream all matter.
Chunks are compact JSON (pydantic's ``model_dump_json``); error events are spaced
(``json.dumps``), except chat's in 0.33. From 0.33 every completions chunk and every chat
content chunk carries ``kv_transfer_params``: null, except on the chunk that finishes the
choice, which carries the engine's (null on a decode).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from aiohttp import web

from ..engine.request import KV_LOAD_FAILED, StreamSignal, TokenEvent
from .exchange import Exchange
from .validation import ResponseSpec

logger = logging.getLogger(__name__)


def usage(spec: ResponseSpec, completion_tokens: int) -> dict[str, Any]:
    prompt = sum(spec.prompt_lens)
    return {
        "prompt_tokens": prompt,
        "total_tokens": prompt + completion_tokens,
        "completion_tokens": completion_tokens,
    }


def prompt_tokens_details(ex: Exchange, *, stream: bool) -> dict[str, Any] | None:
    """usage.prompt_tokens_details: prefix-cache hits, with --enable-prompt-tokens-details.

    0.32 takes the count from the first output of a stream and from the last prompt's
    result otherwise; chat also reports the tokens newly cached. A JSON answer dumps every
    field (None included), a stream's usage chunk drops None fields.
    """
    if not ex.engine.config.enable_prompt_tokens_details:
        return None
    req = ex.choices[0] if stream or ex.spec.chat else ex.choices[-1]
    created = req.created_cache_tokens if ex.spec.chat else None
    details: dict[str, Any] = {"cached_tokens": req.cached_tokens}
    if not stream:
        return dict(details, created_cache_tokens=created, multimodal_tokens=None)
    if created is not None:
        details["created_cache_tokens"] = created
    return details


def _json_choice(spec: ResponseSpec, index: int, text: str, final: TokenEvent) -> dict[str, Any]:
    if spec.chat:
        return {
            "index": index,
            "message": {
                "role": "assistant",
                "content": text,
                "reasoning_content": None,
                "tool_calls": [],
            },
            "logprobs": None,
            "finish_reason": final.finish_reason,
            "stop_reason": final.stop_reason,
        }
    return {
        "index": index,
        "text": text,
        "logprobs": None,
        "finish_reason": final.finish_reason,
        "stop_reason": final.stop_reason,
        "prompt_logprobs": None,
    }


async def respond_json(ex: Exchange) -> web.Response:
    """Collect every choice, then answer once (0.32 completion/serving.py shapes)."""
    spec = ex.spec
    texts = {ch.index: "" for ch in ex.choices}
    tokens = {ch.index: 0 for ch in ex.choices}
    finals: dict[int, TokenEvent] = {}
    await ex.checkpoint()
    while len(finals) < len(ex.choices):
        ev = await ex.next_event()
        if isinstance(ev, StreamSignal):
            return ex.failure(ev)
        texts[ev.index] += ev.delta
        tokens[ev.index] = ev.n_tokens
        if ev.final:
            finals[ev.index] = ev
        ex.tokens += 1
        await ex.checkpoint()
    choices = [_json_choice(spec, ch.index, texts[ch.index], finals[ch.index]) for ch in ex.choices]
    body: dict[str, Any] = {
        "id": spec.resp_id,
        "object": "chat.completion" if spec.chat else "text_completion",
        "created": spec.created,
        "model": spec.model,
        "choices": choices,
        "usage": dict(
            usage(spec, sum(tokens.values())),
            prompt_tokens_details=prompt_tokens_details(ex, stream=False),
        ),
        # 0.32 completion/serving.py: final_res_batch[0].kv_transfer_params
        "kv_transfer_params": finals[ex.choices[0].index].kv_params,
    }
    if spec.chat:
        body["prompt_logprobs"] = None
    ex.finish(200)
    return web.json_response(body)


class _Sse:
    """Writes one SSE response: ``data: <json>`` events in vLLM's chunk shapes."""

    def __init__(self, ex: Exchange, resp: web.StreamResponse) -> None:
        self._spec = ex.spec
        self._resp = resp
        self._object = "chat.completion.chunk" if ex.spec.chat else "text_completion"
        self.v033 = ex.engine.config.vllm_version != "0.32"

    async def send(self, payload: dict[str, Any] | str) -> None:
        data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
        await self._resp.write(f"data: {data}\n\n".encode())

    async def send_error(self, error: dict[str, Any]) -> None:
        """An error event: json.dumps spacing, but 0.33's chat serialises it compactly."""
        await self.send(error if self._spec.chat and self.v033 else json.dumps(error))

    def chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        spec = self._spec
        return {
            "id": spec.resp_id,
            "object": self._object,
            "created": spec.created,
            "model": spec.model,
            "choices": choices,
        }

    def token_choice(self, ev: TokenEvent) -> dict[str, Any]:
        if self._spec.chat:
            return {
                "index": ev.index,
                "delta": {"content": ev.delta},
                "logprobs": None,
                "finish_reason": ev.finish_reason,
                "stop_reason": ev.stop_reason,
            }
        return {
            "index": ev.index,
            "text": ev.delta,
            "logprobs": None,
            "finish_reason": ev.finish_reason,
            "stop_reason": ev.stop_reason,
        }

    async def role(self, index: int) -> None:
        """A chat stream opens each choice with the assistant role and empty content."""
        delta = {"role": "assistant", "content": ""}
        await self.send(
            self.chunk([{"index": index, "delta": delta, "logprobs": None, "finish_reason": None}])
        )


async def respond_stream(ex: Exchange) -> web.StreamResponse:
    """Stream token chunks as the engine produces them, then usage and ``[DONE]``.

    Headers go out before the engine runs (vLLM returns its generator first), so an engine
    death after this point is a 200 followed by an SSE error chunk.
    """
    spec = ex.spec
    resp = web.StreamResponse(
        status=200, headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    sse = _Sse(ex, resp)
    try:
        await resp.prepare(ex.request)
        await ex.checkpoint()
        role_sent: set[int] = set()
        tokens = {ch.index: 0 for ch in ex.choices}
        done: set[int] = set()
        while len(done) < len(ex.choices):
            ev = await ex.next_event()
            if isinstance(ev, StreamSignal):
                status, err = ex.ended_by(ev)
                if ev is KV_LOAD_FAILED and spec.chat:
                    # The failure is the request's first engine output, and chat opens
                    # every choice with its role before it checks that output for errors.
                    for choice in ex.choices:
                        if choice.index not in role_sent:
                            await sse.role(choice.index)
                await sse.send_error(err)
                await sse.send("[DONE]")
                await resp.write_eof()
                ex.finish(status)
                return resp
            tokens[ev.index] = ev.n_tokens
            ex.tokens += 1
            if spec.chat:
                if ev.index not in role_sent:
                    role_sent.add(ev.index)
                    await sse.role(ev.index)
                if not ev.delta and not ev.final:
                    await ex.checkpoint()
                    continue
            c = sse.chunk([sse.token_choice(ev)])
            if spec.continuous_usage:
                prompt_len = ex.prompt_len(ev.index)
                c["usage"] = {
                    "prompt_tokens": prompt_len,
                    "total_tokens": prompt_len + ev.n_tokens,
                    "completion_tokens": ev.n_tokens,
                }
            if sse.v033:  # the model's last field: after usage
                c["kv_transfer_params"] = ev.kv_params if ev.final else None
            await sse.send(c)
            if ev.final:
                done.add(ev.index)
            await ex.checkpoint()
        if spec.include_usage:
            final_usage = usage(spec, sum(tokens.values()))
            details = prompt_tokens_details(ex, stream=True)
            if details is not None:
                final_usage["prompt_tokens_details"] = details
            await sse.send(dict(sse.chunk([]), usage=final_usage))
        await sse.send("[DONE]")
        await resp.write_eof()
    except (ConnectionError, RuntimeError) as e:
        # The client went away while we were writing (aiohttp may not have cancelled
        # the handler yet).
        logger.debug("%s stream write failed: %r", ex.ledger.tag, e)
        ex.cancelled()
        return resp
    ex.finish(200)
    return resp
