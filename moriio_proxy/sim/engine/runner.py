"""Runs the toy model for one engine request: time spent on the prompt, the planned output,
and tokens handed to the HTTP handler ``token_latency`` apart."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from ..model import OutputPlan, garbage_seed, plan_output
from ..settings import SimConfig, SimStats
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

    def __init__(self, config: SimConfig, stats: SimStats, tag: str) -> None:
        self.config = config
        self.stats = stats
        self.tag = tag

    async def compute_prompt(self, req: EngineRequest) -> None:
        """The time the engine spends on the prompt before the first token.

        Every leg kind passes here once, so a prefix-cache model charges only the uncached
        tokens in this one place.
        """
        await _sleep(self.config.prefill_latency)

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
