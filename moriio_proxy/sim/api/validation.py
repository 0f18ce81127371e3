"""Request validation as vLLM 0.32's OpenAI server does it, and the split of one HTTP request
into engine requests (one per prompt and per ``n``).

What is refused here never reaches the engine: a malformed leg the proxy sends gets vLLM's
400 (or 404) and nothing else happens, which is why these messages match vLLM's.
"""

from __future__ import annotations

import copy
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..engine.request import EngineRequest
from ..model import Stopping, chat_prompt_text
from ..settings import LegRecord, SimConfig
from .errors import BadRequest


@dataclass(frozen=True)
class ResponseSpec:
    """How the answer to one HTTP request is shaped (ids, object names, usage reporting)."""

    chat: bool
    stream: bool
    resp_id: str
    created: int
    model: str
    include_usage: bool
    continuous_usage: bool
    prompt_lens: list[int]


@dataclass(frozen=True)
class ParsedRequest:
    """A generation request that passed validation."""

    spec: ResponseSpec
    prompts: list[list[str]]  # each prompt as its tokens (words)
    n: int
    max_tokens: list[int]  # per prompt, clamped to the context left
    stopping: Stopping
    kv: dict[str, Any] | None  # kv_transfer_params (prompt_token_ids already taken out)
    dp_rank: int | None  # from X-data-parallel-rank; None: the engine balances


def parse_request(
    body: Any, chat: bool, headers: Mapping[str, str], config: SimConfig
) -> ParsedRequest:
    """Validate like vLLM 0.32's OpenAI server; raises BadRequest with vLLM's message."""
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.")
    model = body.get("model")
    if model is not None and model != config.model:
        raise BadRequest(
            f"The model `{model}` does not exist.", status=404, err_type="NotFoundError"
        )
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise BadRequest("`stream` must be a boolean.", param="stream")
    if body.get("stream_options") and not stream:
        raise BadRequest(
            "Stream options can only be defined when `stream=True`.", param="stream_options"
        )
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise BadRequest("`stream_options` must be an object.", param="stream_options")
    kv = body.get("kv_transfer_params")
    if kv is not None and not isinstance(kv, dict):
        raise BadRequest("`kv_transfer_params` must be an object.")

    prompts = _prompts(body, chat)
    kv, prompts = _reused_prompt_token_ids(body, kv, prompts)
    _check_prompt_lengths(prompts, config.max_model_len)
    n = _n(body)
    requested = _requested_max_tokens(body, chat, config)
    stopping = _stopping(body)
    # get_max_tokens (serve/utils/api_utils.py): clamp to the context left, no error.
    per_prompt_max = [min(requested, config.max_model_len - len(w)) for w in prompts]
    for mt in per_prompt_max:
        if stopping.min_tokens > mt:
            raise BadRequest(
                f"min_tokens must be less than or equal to max_tokens={mt}, "
                f"got {stopping.min_tokens}."
            )
    dp_rank = _dp_rank(headers, config.dp_size)

    base_id = headers.get("X-Request-Id")
    if base_id is None:
        base_id = uuid.uuid4().hex
    include_usage = bool(stream) and bool(stream_options.get("include_usage"))
    spec = ResponseSpec(
        chat=chat,
        stream=bool(stream),
        resp_id=("chatcmpl-" if chat else "cmpl-") + base_id,
        created=int(time.time()),
        model=config.model,
        include_usage=include_usage,
        continuous_usage=include_usage and bool(stream_options.get("continuous_usage_stats")),
        prompt_lens=[len(w) for w in prompts],
    )
    return ParsedRequest(spec, prompts, n, per_prompt_max, stopping, kv, dp_rank)


def split(
    parsed: ParsedRequest, rec: LegRecord, pick_rank: Callable[[], int]
) -> list[EngineRequest]:
    """One engine request per prompt and per ``n``, with vLLM's internal request ids.

    Each gets its own copy of kv_transfer_params: the connector writes into it.
    """
    spec = parsed.spec
    out: list[EngineRequest] = []
    for p_idx, words in enumerate(parsed.prompts):
        sub_id = (
            spec.resp_id if spec.chat and len(parsed.prompts) == 1 else f"{spec.resp_id}-{p_idx}"
        )
        for j in range(parsed.n):
            engine_id = f"{sub_id}-{uuid.uuid4().hex[:8]}"
            if parsed.n > 1:
                engine_id = f"{j}_{engine_id}"
            out.append(
                EngineRequest(
                    index=p_idx * parsed.n + j,
                    prompt_idx=p_idx,
                    words=words,
                    engine_id=engine_id,
                    rank=parsed.dp_rank if parsed.dp_rank is not None else pick_rank(),
                    max_tokens=parsed.max_tokens[p_idx],
                    stopping=parsed.stopping,
                    kv=copy.deepcopy(parsed.kv) if parsed.kv is not None else None,
                    rec=rec,
                )
            )
    return out


def _prompts(body: dict[str, Any], chat: bool) -> list[list[str]]:
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("Field required: `messages`", param="messages")
        if not all(isinstance(m, dict) for m in messages):
            raise BadRequest("Each message must be an object.", param="messages")
        return [chat_prompt_text(messages).split()]
    prompt = body.get("prompt")
    if prompt is None:
        raise BadRequest("Field required: `prompt`", param="prompt")
    if isinstance(prompt, str):
        return [prompt.split()]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return [p.split() for p in prompt]
        if all(type(p) is int for p in prompt):
            return [[str(p) for p in prompt]]
        if all(isinstance(p, list) and all(type(x) is int for x in p) for p in prompt):
            return [[str(x) for x in p] for p in prompt]
    raise BadRequest(
        "`prompt` must be a string, a list of strings, a list of token ids or a list of "
        "token id lists.",
        param="prompt",
    )


def _reused_prompt_token_ids(
    body: dict[str, Any], kv: dict[str, Any] | None, prompts: list[list[str]]
) -> tuple[dict[str, Any] | None, list[list[str]]]:
    """online_renderer._reused_prompt_token_ids: a decode may reuse P's token ids."""
    if not isinstance(kv, dict) or "prompt_token_ids" not in kv:
        return kv, prompts
    kv = dict(kv)
    ids = kv.pop("prompt_token_ids")
    if ids is None or body.get("echo"):
        return kv, prompts
    if not isinstance(ids, list) or not ids or any(type(x) is not int or x < 0 for x in ids):
        raise BadRequest(
            "`kv_transfer_params['prompt_token_ids']` must be a non-empty list "
            "of non-negative integers.",
            param="kv_transfer_params.prompt_token_ids",
        )
    return kv, [[str(x) for x in ids]]


def _check_prompt_lengths(prompts: list[list[str]], max_model_len: int) -> None:
    for words in prompts:
        if not words:
            raise BadRequest("The decoder prompt cannot be empty")
        if len(words) > max_model_len:
            raise BadRequest(
                f"This model's maximum context length is {max_model_len} tokens. "
                f"However, your prompt contains {len(words)} input tokens, which exceeds "
                "this limit even without any output tokens. Please reduce the length of "
                "the input prompt.",
                param="input_tokens",
            )
        if len(words) == max_model_len:
            raise BadRequest(
                f"The decoder prompt (length {len(words)}) plus the number of requested "
                f"output tokens (at least 1) is longer than the maximum model length of "
                f"{max_model_len}."
            )


def _n(body: dict[str, Any]) -> int:
    n = body.get("n", 1)
    n = 1 if n is None else n
    if type(n) is not int or n < 1:
        raise BadRequest("n must be at least 1.", param="n")
    if n > 1 and body.get("temperature") == 0:
        raise BadRequest(f"n must be 1 when using greedy sampling, got {n}.")
    return n


def _requested_max_tokens(body: dict[str, Any], chat: bool, config: SimConfig) -> int:
    """The requested output length (max_completion_tokens wins over max_tokens in chat)."""
    if chat and body.get("max_completion_tokens") is not None:
        requested, param = body.get("max_completion_tokens"), "max_completion_tokens"
    else:
        requested, param = body.get("max_tokens"), "max_tokens"
    if requested is None:
        requested = config.default_max_tokens
    if type(requested) is not int:
        raise BadRequest(f"`{param}` must be an integer.", param=param)
    if requested > config.max_model_len:
        raise BadRequest(
            f"{param}={requested} cannot be greater than max_model_len="
            f"{config.max_model_len}. Please request fewer output tokens.",
            param=param,
        )
    if requested < 1:
        raise BadRequest(f"max_tokens must be at least 1, got {requested}.", param=param)
    return requested


def _stopping(body: dict[str, Any]) -> Stopping:
    min_tokens = body.get("min_tokens", 0)
    min_tokens = 0 if min_tokens is None else min_tokens
    if type(min_tokens) is not int or min_tokens < 0:
        raise BadRequest(f"min_tokens must be greater than or equal to 0, got {min_tokens}.")
    stop = body.get("stop")
    if stop is None:
        stops: list[str] = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = list(stop)
    else:
        raise BadRequest("`stop` must be a string or a list of strings.", param="stop")
    return Stopping(
        min_tokens=min_tokens,
        stops=tuple(stops),
        include_stop=bool(body.get("include_stop_str_in_output", False)),
    )


def _dp_rank(headers: Mapping[str, str], dp_size: int) -> int | None:
    """X-data-parallel-rank: a non-integer is ignored (0.32 _get_data_parallel_rank), one out
    of range refused."""
    header = headers.get("X-data-parallel-rank")
    if header is None:
        return None
    try:
        rank = int(header)
    except ValueError:
        return None
    if not 0 <= rank < dp_size:
        raise BadRequest(f"data_parallel_rank {rank} is out of range [0, {dp_size}).")
    return rank
