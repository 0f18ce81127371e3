"""Load-generator worker processes: one cell's users split over several event loops.

One Python process can only use one core; at a few thousand responses a second, a single
load generator would itself become what is measured. Workers are spawned once per run
(a fresh interpreter: nothing inherited from the parent), then for each cell:

1. the parent sends each worker its ``Job``; the worker builds its requests and opens its
   connections, then answers "ready" (so setup never eats into the warm-up);
2. the parent sends every worker the same ``Window``, starting a moment later;
3. each worker runs it and sends back its ``Outcome``; the parent merges them.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import multiprocessing.connection
import time
from collections.abc import Callable, Sequence
from typing import Any

from .loadgen import Job, Outcome, Prepared, Window

READY = "ready"


def _failed(exc: BaseException) -> Outcome:
    outcome = Outcome()
    outcome.errors["loadgen_crash"] += 1
    outcome.error_samples.append(f"loadgen_crash: {exc!r}")
    return outcome


async def _serve(job: Job, conn: multiprocessing.connection.Connection) -> Outcome:
    prepared = Prepared(job)
    try:
        await prepared.connect()
    except BaseException:
        prepared.close()
        raise
    conn.send(READY)
    window = conn.recv()  # blocks the loop a moment; nothing is in flight yet
    return await prepared.run(window)


def _worker_main(conn: multiprocessing.connection.Connection) -> None:
    """Run each job sent; None ends the process. Failures are reported, never swallowed."""
    while True:
        job = conn.recv()
        if job is None:
            return
        try:
            conn.send(asyncio.run(_serve(job, conn)))
        except Exception as exc:
            conn.send(_failed(exc))


class WorkerPool:
    def __init__(self, size: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.pipes: list[multiprocessing.connection.Connection] = []
        self.procs: list[Any] = []
        for _ in range(size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, args=(child,), daemon=True)
            proc.start()
            child.close()
            self.pipes.append(parent)
            self.procs.append(proc)

    @property
    def size(self) -> int:
        return len(self.procs)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def run(
        self,
        jobs: Sequence[Job],
        window_from: Callable[[float], Window],
        during: Callable[[Window], None],
        setup_timeout: float = 60.0,
    ) -> Outcome:
        """Run ``jobs`` (one per worker) over the window ``window_from(now)`` once all are
        ready; ``during(window)`` runs in this process meanwhile (it samples CPU)."""
        pipes = self.pipes[: len(jobs)]
        for pipe, job in zip(pipes, jobs, strict=True):
            pipe.send(job)
        merged = Outcome()
        ready = []
        for pipe in pipes:
            if not pipe.poll(setup_timeout):
                raise RuntimeError(f"a load-generator worker was not ready in {setup_timeout} s")
            answer = pipe.recv()
            if answer == READY:
                ready.append(pipe)
            else:  # it failed to set up and sent its Outcome instead
                merged.merge(answer)
        window = window_from(time.monotonic())
        for pipe in ready:
            pipe.send(window)
        during(window)
        for pipe in ready:
            merged.merge(pipe.recv())
        return merged

    def close(self) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError):
                pipe.send(None)
        for proc in self.procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()


def split_users(concurrency: int, workers: int) -> list[tuple[int, int]]:
    """(first user, users) per worker, as even as possible; never a worker with none."""
    used = max(1, min(workers, concurrency))
    base, extra = divmod(concurrency, used)
    shares, first = [], 0
    for w in range(used):
        n = base + (w < extra)
        shares.append((first, n))
        first += n
    return shares
