"""Starting the proxy and simulators as processes, and reading their CPU from /proc.

Ports: every process here binds its own (``--port 0``) and announces the port it got, which
this module reads back from the process's output. Picking a "free" port in the harness and
passing it on is a race (another process may take it in between), so it is not done.

CPU: a process's utime+stime in /proc/PID/stat covers all its threads; children that were
reaped are in cutime+cstime; live descendants are read one by one. The sum is the CPU the
whole process tree has used so far, so a difference of two samples is what it spent
between them, whether it runs threads, worker processes or both.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from moriio_proxy.testing import parse_serving, parse_sim_started

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[1]
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class StartError(RuntimeError):
    """A process exited or never announced itself; the message carries its log's tail."""


def fresh_log(log: Path) -> Path:
    """``log``, or ``log`` with a number added when it exists: a relaunch keeps the old log."""
    n = 1
    candidate = log
    while candidate.exists():
        candidate = log.with_name(f"{log.stem}.{n}{log.suffix}")
        n += 1
    return candidate


def spawn(args: Sequence[str], log: Path) -> subprocess.Popen[bytes]:
    """Start ``args`` with stdout and stderr to ``log`` (the log is also how ports are read)."""
    handle = log.open("wb")
    try:
        return subprocess.Popen(
            list(args), stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True
        )
    finally:
        handle.close()  # the child holds its own descriptor


def stop(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGINT (the clean path of every process here), then SIGKILL if it does not exit."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def log_tail(log: Path, lines: int = 15) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def wait_for_output(
    proc: subprocess.Popen[bytes], log: Path, patterns: Sequence[re.Pattern[str]], timeout: float
) -> list[re.Match[str]]:
    """Wait until each pattern matches a line of ``log``; fail fast if the process exits."""

    def all_found(text: str) -> list[re.Match[str]] | None:
        found = [p.search(text) for p in patterns]
        return [m for m in found if m is not None] if all(found) else None

    return wait_for_log(proc, log, all_found, timeout)


def wait_for_log(
    proc: subprocess.Popen[bytes], log: Path, read: Callable[[str], T | None], timeout: float
) -> T:
    """Wait until ``read(the log's text)`` finds something and return it; fail fast if the
    process exits."""
    deadline = time.monotonic() + timeout
    while True:
        text = log.read_text(errors="replace") if log.exists() else ""
        found = read(text)
        if found is not None:
            return found
        if proc.poll() is not None:
            raise StartError(f"{log.name}: exited with {proc.returncode}:\n{log_tail(log)}")
        if time.monotonic() > deadline:
            raise StartError(f"{log.name}: not ready after {timeout:g} s:\n{log_tail(log)}")
        time.sleep(0.05)


@dataclass
class ProxyProcess:
    proc: subprocess.Popen[bytes]
    log: Path
    http_port: int
    discovery_port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def discovery(self) -> str:
        return f"127.0.0.1:{self.discovery_port}"


def start_proxy(
    log: Path,
    extra: Sequence[str] = (),
    timeout: float = 30.0,
    launcher: Sequence[str] = ("-m", "moriio_proxy"),
) -> ProxyProcess:
    """``moriio-proxy serve`` on ports it binds itself, read back from its startup log.

    It must log at info level or above for those two lines; no per-request line is logged
    at info, so this is also the level the proxy runs at by default. ``launcher``: the
    interpreter's arguments before ``serve`` (a wrapper module that instruments the proxy).
    """
    log = fresh_log(log)
    args = [
        sys.executable, *launcher, "serve", "--host", "127.0.0.1", "--port", "0",
        "--discovery-host", "127.0.0.1", "--discovery-port", "0", *extra,
    ]  # fmt: skip
    proc = spawn(args, log)
    try:
        serving = wait_for_log(proc, log, parse_serving, timeout)
    except StartError:
        stop(proc)
        raise
    assert serving.discovery_port is not None
    return ProxyProcess(proc, log, serving.port, serving.discovery_port)


@dataclass
class SimProcess:
    proc: subprocess.Popen[bytes]
    log: Path
    role: str
    url: str
    http_address: str
    zmq_address: str
    control_url: str | None


def start_sim(
    role: str,
    mode: str,
    log: Path,
    proxy: str | None,
    extra: Sequence[str] = (),
    timeout: float = 30.0,
) -> SimProcess:
    """``moriio-proxy sim`` on ports it binds itself; ``proxy=None``: no heartbeats at all."""
    log = fresh_log(log)
    args = [
        sys.executable, "-m", "moriio_proxy", "sim", "--role", role, "--mode", mode,
        "--host", "127.0.0.1", "--port", "0", "--proxy", proxy or "",
        "--heartbeat-interval", "1", *extra,
    ]  # fmt: skip
    proc = spawn(args, log)
    try:
        found = wait_for_log(proc, log, parse_sim_started, timeout)
    except StartError:
        stop(proc)
        raise
    return SimProcess(
        proc, log, found.role, found.url, found.http_address, found.zmq_address, found.control_url
    )


# ------------------------------------------------------------------------------- CPU


def stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may hold spaces: split after its last ')'.
    return raw[raw.rindex(")") + 2 :].split()


def children_by_parent() -> dict[int, list[int]]:
    """Every live process's children, keyed by parent pid."""
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = stat_fields(int(entry))
            if fields is not None:
                tree.setdefault(int(fields[1]), []).append(int(entry))
    return tree


def tree_cpu_seconds(pids: Sequence[int]) -> dict[int, float]:
    """CPU seconds used so far by each process in ``pids`` with all its threads and descendants.

    Fields (after the command): [11] utime, [12] stime, [13] cutime, [14] cstime.
    """
    children = children_by_parent()
    totals: dict[int, float] = {}
    for root in pids:
        ticks = 0
        todo = [root]
        while todo:
            pid = todo.pop()
            fields = stat_fields(pid)
            if fields is None:
                continue
            ticks += sum(int(x) for x in fields[11:15])
            todo.extend(children.get(pid, ()))
        totals[root] = ticks / CLOCK_TICKS
    return totals


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent not idle since boot (every process, ours or not)."""
    with open("/proc/stat") as handle:
        values = [int(x) for x in handle.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    busy = sum(values[:8]) - idle  # user nice system idle iowait irq softirq steal
    return busy / CLOCK_TICKS
