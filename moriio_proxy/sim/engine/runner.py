"""Runs the toy model for one engine request: time spent on the prompt (what the prefix
cache does not hold), the planned output, and tokens handed to the HTTP handler
``token_latency`` apart."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from ..connector import external_prompt_tokens, leg_kind
from ..model import OutputPlan, garbage_seed, plan_output
from ..settings import SimConfig, SimStats
from .memory import DpRank
from .request import EngineRequest, OutputQueue, TokenEvent

logger = logging.getLogger(__name__)

#: Called as the last token is produced; returns the kv_transfer_params of the answer.
OnFinish = Callable[[], "dict[str, Any] | None"]
#: Starts a background task the engine owns (cancelled when the instance stops).
Spawn = Callable[[Coroutine[Any, Any, Any]], "asyncio.Task[Any]"]


async def _sleep(seconds: float) -> None:
    await asyncio.sleep(seconds if seconds > 0 else 0)


class ModelRunner:
    """The model side of the engine, shared by every leg kind.

    Latencies are read from the config at each use: tests retune a running instance.
    """

    def __init__(self, config: SimConfig, stats: SimStats, tag: str, ranks: list[DpRank]) -> None:
        self.config = config
        self.stats = stats
        self.tag = tag
        self.ranks = ranks

    async def compute_prompt(self, req: EngineRequest) -> None:
        """The time the engine spends on the prompt before the first token.

        Every leg kind passes here once. ``prefill_latency`` is paid by every request at
        once; ``prefill_token_latency`` per computed token is paid on the request's rank one
        request after another (a GPU runs one forward pass at a time, and batching only
        shares its throughput), so a rank given more work than it computes queues it, and
        time to first token grows, as on a real engine. A request cancelled while queued
        keeps its place in the rank's schedule: a simplification.
        """
        cfg = self.config
        st = self.ranks[req.rank]
        delay = cfg.prefill_latency
        cost = self.account_prompt(req, st) * cfg.prefill_token_latency
        if cost > 0:
            now = asyncio.get_running_loop().time()
            st.compute_free_at = max(now, st.compute_free_at) + cost
            delay += st.compute_free_at - now
        await _sleep(delay)

    def account_prompt(self, req: EngineRequest, st: DpRank) -> int:
        """Look the prompt up in the rank's prefix cache, cache its blocks, record what was
        cached on the request and in the stats; returns the prompt tokens to compute.

        A decode leg's prompt arrives as KV (0.32's consumer claims all of it in WRITE mode
        and all but the last token in READ mode) and it reports the prefill's cache hits
        when P returned them (``remote_prefill_cached_tokens``), as vLLM's output
        processor does; anything else is looked up here, and a READ consumer still claims
        its prompt as external (the garbage path of a plain request).
        """
        cfg, stats = self.config, self.stats
        n = len(req.words)
        if leg_kind(cfg.role, req.kv) == "decode":
            assert req.kv is not None
            external = n if cfg.mode == "WRITE" else max(n - 1, 0)
            remote = req.kv.get("remote_prefill_cached_tokens")
            req.cached_tokens = remote if type(remote) is int else external
            computed = n - external
        else:
            local = 0
            cache = st.cache
            if cache is not None:
                keys = cache.keys(req.words)
                local = cache.match(keys, n)
                stats.prefix_cache_evicted_blocks += cache.insert(keys)
                stats.prefix_cache_queries += n
                stats.prefix_cache_hits += local
                req.created_cache_tokens = max(len(keys) * cache.block_size - local, 0)
            cached = max(local, external_prompt_tokens(cfg.role, cfg.mode, n))
            req.cached_tokens = cached
            computed = n - cached
        stats.prompt_tokens_computed += computed
        req.rec.cached_tokens += req.cached_tokens
        req.rec.computed_tokens += computed
        return computed

    def plan(self, req: EngineRequest, seed: str, garbage: bool = False) -> OutputPlan:
        """The request's whole output, generated from the KV fingerprint ``seed``."""
        return plan_output(
            seed, req.max_tokens, req.stopping, eos=req.ends_at_once, garbage=garbage
        )

    def garbage(self, req: EngineRequest, why: str) -> str:
        """Count and log an answer computed without valid KV; returns its seed."""
        self.stats.garbage_outputs += 1
        req.rec.garbage = True
        logger.warning(
            "%s request %s: answer computed WITHOUT valid KV (%s): output is garbage",
            self.tag,
            req.engine_id,
            why,
        )
        return garbage_seed(req.text)

    async def emit(
        self,
        req: EngineRequest,
        plan: OutputPlan,
        queue: OutputQueue,
        on_finish: OnFinish | None = None,
    ) -> None:
        """Hand tokens to the HTTP handler, token_latency apart; the last one carries the end.

        With a token_latency of 0 every token is ready at once: they are queued without a turn
        of the event loop each (the handler still writes one chunk per token), which halves
        what a zero-latency benchmark's decode costs.
        """
        last = len(plan.deltas) - 1
        for j, delta in enumerate(plan.deltas):
            latency = self.config.token_latency
            if latency > 0:
                await asyncio.sleep(latency)
            if j < last:
                queue.put_nowait(TokenEvent(req.index, delta, j + 1))
                continue
            kv_params = on_finish() if on_finish is not None else None
            queue.put_nowait(
                TokenEvent(
                    req.index,
                    delta,
                    j + 1,
                    plan.finish_reason,
                    plan.stop_reason,
                    kv_params,
                    final=True,
                )
            )
