"""``serve --workers N``: N serving processes on one port, fed by one discovery listener.

One Python process relays requests on one core. To use more, the supervisor (the process
the operator started) runs discovery once (the ZMQ port is bound once, the pod watch runs
once) and starts N workers, each a fresh interpreter (multiprocessing's spawn: nothing of
the supervisor's event loop or sockets leaks into them) that listens on the same port with
SO_REUSEPORT, so the kernel spreads client connections over them. The supervisor
publishes its registry to the workers (discovery/mirror.py) and they report their load
back. Metrics are counted in prometheus-client's multiprocess mode, so a scrape of any
worker adds up every process.

The supervisor restarts a worker that dies, and on SIGTERM or SIGINT passes the signal on
and waits for every worker to drain (``--drain-timeout``) before it exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from typing import Any

import msgpack
import zmq
import zmq.asyncio
from prometheus_client.multiprocess import mark_process_dead

from .config import ProxyConfig
from .discovery import make_discovery
from .discovery.mirror import Acknowledgements, MirrorSource, encode_snapshot, sum_reports
from .metrics import Metrics, enable_multiprocess
from .state import build_registry, build_upstream
from .version_probe import VersionProbe

log = logging.getLogger("moriio_proxy.workers")

SNAPSHOT_INTERVAL = 0.5  # seconds between snapshots when nothing changed
_RESTART_BACKOFF = (0.5, 30.0)  # first and largest delay before restarting a dead worker
_DRAIN_MARGIN = 10.0  # seconds past --drain-timeout before a worker is killed


def bind_probe(host: str, port: int) -> socket.socket:
    """Claim the HTTP port for the worker group without listening on it.

    Binding first makes a taken port fail before any worker starts and turns port 0 into
    a real one. The socket joins the SO_REUSEPORT group but never listens, so the kernel
    gives it no connections; it is closed once the workers listen.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock


class WorkerStartError(RuntimeError):
    """A worker died before it ever served: a setup problem restarting would repeat."""


class Supervisor:
    """Discovery, the registry snapshot feed, and the worker processes."""

    def __init__(self, config: ProxyConfig, on_ready: Callable[[int], None]) -> None:
        self.config = config
        self.on_ready = on_ready
        self.port = 0
        self._dir = tempfile.mkdtemp(prefix="moriio-proxy-")
        metrics_dir = os.path.join(self._dir, "metrics")
        os.mkdir(metrics_dir)
        enable_multiprocess(metrics_dir)  # before any Metrics() here or in a worker
        self.metrics = Metrics()
        self.registry = build_registry(config)
        self.discovery = make_discovery(config, self.registry, self.metrics)
        # The supervisor owns discovery, so it learns the instances' vLLM versions too;
        # a learned version goes to the workers with the next snapshot.
        self.upstream = build_upstream(config)
        self.versions = VersionProbe(self.registry, self.upstream, on_learned=self._on_change)
        self._snapshots = f"ipc://{self._dir}/snapshots"
        self._reports = f"ipc://{self._dir}/reports"
        self._workers: dict[int, BaseProcess] = {}
        self._reports_by_worker: dict[int, dict[str, list[int]]] = {}
        self._acks = Acknowledgements(self.registry)  # operators' actions, via workers
        self._ready: set[int] = set()
        self._changed = asyncio.Event()
        self._stopping = False

    async def run(self, stop: asyncio.Event) -> int:
        probe = bind_probe(self.config.host, self.config.port)
        self.port = probe.getsockname()[1]
        ctx = zmq.asyncio.Context()
        try:
            await self.discovery.start()
            await self.upstream.start()
            await self.versions.start()
            pub = ctx.socket(zmq.PUB)
            pub.setsockopt(zmq.LINGER, 0)
            pub.bind(self._snapshots)
            pull = ctx.socket(zmq.PULL)
            pull.setsockopt(zmq.LINGER, 0)
            pull.bind(self._reports)
            registry = self.registry
            for signal_ in (
                registry.instance_added,
                registry.instance_updated,
                registry.instance_removed,
            ):
                signal_.connect(self._on_change, sender=self.registry, weak=False)
            with contextlib.suppress(NotImplementedError, RuntimeError):
                asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self._pass_sighup)
            for index in range(self.config.workers):
                self._start_worker(index)
            tasks = [
                asyncio.ensure_future(self._publish(pub)),
                asyncio.ensure_future(self._collect(pull, probe)),
                asyncio.ensure_future(self._watch_workers()),
            ]
            try:
                # A worker that cannot start at all ends the supervisor with its error.
                await asyncio.wait(
                    [asyncio.ensure_future(stop.wait()), tasks[2]],
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if tasks[2].done():
                    tasks[2].result()
            finally:
                await self._shut_down()
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            probe.close()
            await self.discovery.stop()
            await self.versions.stop()
            await self.upstream.close()
            ctx.destroy(linger=0)
            shutil.rmtree(self._dir, ignore_errors=True)
        return 0

    def _pass_sighup(self) -> None:
        """SIGHUP (reload the client keys file) goes on to every worker that serves; one
        still starting reads the file anyway, and has no handler yet to survive it."""
        for index, process in self._workers.items():
            if index in self._ready and process.pid is not None and process.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGHUP)

    def _on_change(self, *_: Any, **__: Any) -> None:
        self._changed.set()

    def _start_worker(self, index: int) -> None:
        spawn = multiprocessing.get_context("spawn")
        process = spawn.Process(
            target=worker_main,
            args=(self.config, self.port, self._snapshots, self._reports, index),
            name=f"moriio-proxy-worker-{index}",
        )
        process.start()
        self._workers[index] = process
        log.debug("started worker %d (pid %s)", index, process.pid)

    async def _publish(self, pub: zmq.asyncio.Socket) -> None:
        """A snapshot at once on every registry change, else every SNAPSHOT_INTERVAL."""
        while True:
            fleet = sum_reports(self._reports_by_worker)
            await pub.send(encode_snapshot(self.registry, fleet, self._acks.recent))
            self._changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), SNAPSHOT_INTERVAL)

    async def _collect(self, pull: zmq.asyncio.Socket, probe: socket.socket) -> None:
        """Workers' load reports; the first one from each worker means it serves."""
        while True:
            raw = await pull.recv()
            try:
                report = msgpack.unpackb(raw, raw=False)
                index = int(report["worker"])
                inflight = dict(report.get("inflight") or {})
            except (ValueError, KeyError, TypeError, msgpack.UnpackException):
                log.error("ignoring a malformed worker report")
                continue
            if isinstance(report.get("admin"), dict):  # an operator's action, not a report
                self._acks.apply(report["admin"])
                self._changed.set()  # the acknowledging snapshot goes out at once
                continue
            self._reports_by_worker[index] = inflight
            if index not in self._ready:
                self._ready.add(index)
                if len(self._ready) == self.config.workers:
                    probe.close()  # every worker listens: the placeholder may go
                    self.on_ready(self.port)

    async def _watch_workers(self) -> None:
        """Restart a worker that died while the supervisor was not stopping."""
        delays: dict[int, float] = {}
        while True:
            await asyncio.sleep(0.2)
            for index, process in list(self._workers.items()):
                if process.is_alive() or self._stopping:
                    continue
                self._forget(index, process)
                if index not in self._ready:
                    raise WorkerStartError(
                        f"worker {index} exited with {process.exitcode} before serving; "
                        "see its log lines above"
                    )
                delay = delays.get(index, _RESTART_BACKOFF[0])
                log.error(
                    "worker %d (pid %s) exited with %s; restarting it in %gs",
                    index,
                    process.pid,
                    process.exitcode,
                    delay,
                )
                delays[index] = min(delay * 2, _RESTART_BACKOFF[1])
                await asyncio.sleep(delay)
                if not self._stopping:
                    self._start_worker(index)

    def _forget(self, index: int, process: BaseProcess) -> None:
        self._reports_by_worker.pop(index, None)
        self._workers.pop(index, None)
        if process.pid is not None:
            mark_process_dead(process.pid)  # type: ignore[no-untyped-call]

    async def _shut_down(self) -> None:
        """Pass SIGTERM on and wait for every worker to drain; kill what overstays."""
        self._stopping = True
        for process in self._workers.values():
            if process.pid is not None and process.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGTERM)
        await asyncio.to_thread(self._join_all, self.config.drain_timeout + _DRAIN_MARGIN)
        for index, process in list(self._workers.items()):
            if process.is_alive():
                log.error("worker %d did not drain in time; killing it", index)
                process.kill()
            process.join(timeout=5)
            self._forget(index, process)

    def _join_all(self, timeout: float) -> None:
        """Wait (in a thread: join blocks) until every worker exited or ``timeout`` passed."""
        deadline = time.monotonic() + timeout
        for process in list(self._workers.values()):
            process.join(max(0.0, deadline - time.monotonic()))


def worker_main(config: ProxyConfig, port: int, snapshots: str, reports: str, index: int) -> None:
    """A worker process's entry point (a fresh interpreter started by the supervisor)."""
    from .cli import exit_quickly, run_loop, setup_logging

    setup_logging(config.log_level)
    code = run_loop(_worker(config, port, snapshots, reports, index), config.event_loop)
    raise SystemExit(exit_quickly(code))


async def _worker(config: ProxyConfig, port: int, snapshots: str, reports: str, index: int) -> int:
    from .app import create_app, state
    from .cli import reload_on_sighup, stop_event
    from .security import server_tls
    from .server import bind_listener, serve_configured

    stop = stop_event()
    tls = server_tls(config)

    def mirror(registry: Any, metrics: Metrics) -> MirrorSource:
        return MirrorSource(
            registry,
            metrics,
            snapshots=snapshots,
            reports=reports,
            worker=index,
            on_orphaned=stop.set,
        )

    app = create_app(config, discovery=mirror)
    sock = bind_listener(config.host, port, reuse_port=True)
    proxy = state(app)
    reload_on_sighup(proxy.keys.reload)  # before the first report marks this worker ready
    try:
        await proxy.start()

        async def drain_then_stop() -> None:
            await stop.wait()
            proxy.drain()

        await serve_configured(app, sock, drain_then_stop, config, tls)
    finally:
        await proxy.stop()
        sock.close()
    return 0
