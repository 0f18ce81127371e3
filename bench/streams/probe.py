"""What a process tree holds right now, read from /proc: memory, descriptors, sockets.

Memory is VmRSS from /proc/PID/status, summed over the tree (``serve --workers N`` is a
supervisor and N spawned workers). A sum of RSS counts pages shared between the processes
(the interpreter's code, mostly) once per process; that shared part does not change with
the number of streams, so differences between two sums are real. RssAnon is given beside
it: the process's private heap, where per-stream state lives.

Sockets: each of a process's descriptors that is a socket is looked up by inode in
/proc/net/tcp{,6} and classed by its ports: a connection whose local port is the proxy's
HTTP port is a client's (downstream); one whose remote port is a simulated instance's HTTP
port is upstream, to a P or to a D.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

from ..processes import CLOCK_TICKS, children_by_parent, stat_fields

_TCP_LISTEN = "0A"


def tree(root: int) -> list[int]:
    """``root`` and its live descendants, parents first."""
    children = children_by_parent()
    out, todo = [], [root]
    while todo:
        pid = todo.pop(0)
        out.append(pid)
        todo.extend(sorted(children.get(pid, ())))
    return out


def role(pid: int, root: int) -> str:
    """What a process of the proxy's tree is: the one started, a worker, or the resource
    tracker multiprocessing starts beside spawned workers."""
    if pid == root:
        return "proxy"
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "exited"
    return "resource tracker" if b"resource_tracker" in cmdline else "worker"


def _status(pid: int) -> dict[str, str]:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    fields = {}
    for line in text.splitlines():
        name, _, value = line.partition(":")
        fields[name] = value.strip()
    return fields


def _kib(fields: dict[str, str], name: str) -> int:
    value = fields.get(name, "0 kB").split()
    return int(value[0]) if value else 0


@dataclass(frozen=True)
class Memory:
    pid: int
    name: str
    rss_kib: int
    anon_kib: int
    threads: int


def memory(pids: Iterable[int]) -> list[Memory]:
    """VmRSS, RssAnon and thread count of each process (exited ones are left out)."""
    out = []
    for pid in pids:
        fields = _status(pid)
        if fields:
            out.append(
                Memory(
                    pid,
                    fields.get("Name", "?"),
                    _kib(fields, "VmRSS"),
                    _kib(fields, "RssAnon"),
                    int(fields.get("Threads", "0")),
                )
            )
    return out


def total_kib(rows: Iterable[Memory]) -> tuple[int, int]:
    """(VmRSS, RssAnon) of ``rows`` summed, in KiB."""
    rows = list(rows)
    return sum(r.rss_kib for r in rows), sum(r.anon_kib for r in rows)


def _socket_inodes(pid: int) -> tuple[int, list[int]]:
    """(descriptors, inodes of the socket descriptors) of ``pid``."""
    fd_dir = f"/proc/{pid}/fd"
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return 0, []
    inodes = []
    for name in names:
        try:
            target = os.readlink(f"{fd_dir}/{name}")
        except OSError:
            continue  # closed since the listing
        if target.startswith("socket:["):
            inodes.append(int(target[8:-1]))
    return len(names), inodes


def _tcp_table(pid: int) -> dict[int, tuple[int, int, str]]:
    """inode -> (local port, remote port, state) for the TCP sockets of ``pid``'s netns."""
    table: dict[int, tuple[int, int, str]] = {}
    for name in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            inode = int(parts[9])
            if inode:
                local = int(parts[1].rsplit(":", 1)[1], 16)
                remote = int(parts[2].rsplit(":", 1)[1], 16)
                table[inode] = (local, remote, parts[3])
    return table


@dataclass(frozen=True)
class Sockets:
    """One process's descriptors, its TCP connections classed by peer."""

    pid: int
    fds: int
    clients: int  # accepted on the proxy's HTTP port
    upstream_d: int
    upstream_p: int
    other: int  # listeners, ZMQ, pipes' peers, anything else that is a socket

    def as_dict(self) -> dict[str, int]:
        return {
            "pid": self.pid,
            "fds": self.fds,
            "client_sockets": self.clients,
            "upstream_d_sockets": self.upstream_d,
            "upstream_p_sockets": self.upstream_p,
            "other_sockets": self.other,
        }


def sockets(
    pids: Iterable[int], http_port: int, d_ports: Collection[int], p_ports: Collection[int]
) -> list[Sockets]:
    """Descriptors and classified TCP connections of each process in ``pids``."""
    pids = list(pids)
    table = _tcp_table(pids[0]) if pids else {}
    out = []
    for pid in pids:
        fds, inodes = _socket_inodes(pid)
        kinds: Counter[str] = Counter()
        for inode in inodes:
            local, remote, state = table.get(inode, (0, 0, ""))
            if state and state != _TCP_LISTEN and local == http_port:
                kinds["client"] += 1
            elif remote in d_ports:
                kinds["d"] += 1
            elif remote in p_ports:
                kinds["p"] += 1
            else:
                kinds["other"] += 1
        out.append(Sockets(pid, fds, kinds["client"], kinds["d"], kinds["p"], kinds["other"]))
    return out


# ------------------------------------------------------------------ the machine around us

TCP_COUNTERS = ("ListenOverflows", "ListenDrops", "TCPTimeouts", "TCPAbortOnData", "TCPSynRetrans")


def tcp_counters() -> dict[str, int]:
    """The network namespace's TCP counters that say connections were refused by a full
    accept queue (ListenOverflows/ListenDrops), retransmitted or aborted; shared with every
    other process in the namespace, so only a difference over a phase means anything."""
    lines = Path("/proc/net/netstat").read_text().splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:], strict=False))
            return {name: int(table.get(name, 0)) for name in TCP_COUNTERS}
    return {}


def _cpu(pid: int, reaped: bool) -> float | None:
    fields = stat_fields(pid)
    if fields is None:
        return None
    ticks = int(fields[11]) + int(fields[12])  # utime, stime: all its threads
    if reaped:
        ticks += int(fields[13]) + int(fields[14])  # children it has waited for
    return ticks / CLOCK_TICKS


def process_cpu() -> dict[int, tuple[float, int]]:
    """pid -> (CPU seconds with its reaped children's, parent pid) of every live process:
    a shell or test runner whose short-lived children came and went between two readings
    shows their CPU (see ``cpu_between``)."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = stat_fields(int(entry))
            if fields is not None:
                ticks = sum(int(x) for x in fields[11:15])
                out[int(entry)] = (ticks / CLOCK_TICKS, int(fields[1]))
    return out


def cpu_between(
    start: dict[int, tuple[float, int]], end: dict[int, tuple[float, int]]
) -> dict[int, float]:
    """CPU seconds each process alive at ``end`` used since ``start``, its children
    reaped meanwhile included. A child alive at ``start`` and reaped since brings its whole
    life's CPU into its parent's count; what it had used before ``start`` is taken off."""
    before_start: dict[int, float] = {}
    for pid, (seconds, parent) in start.items():
        if pid not in end:
            before_start[parent] = before_start.get(parent, 0.0) + seconds
    return {
        pid: seconds - start.get(pid, (0.0, 0))[0] - before_start.get(pid, 0.0)
        for pid, (seconds, _) in end.items()
    }


def own_cpu(pids: Iterable[int]) -> dict[int, float]:
    """CPU seconds of each process itself (all its threads, no children)."""
    out = {}
    for pid in pids:
        seconds = _cpu(pid, reaped=False)
        if seconds is not None:
            out[pid] = seconds
    return out


def command(pid: int, width: int = 90) -> str:
    """A process's command line, shortened (its name in brackets for a kernel thread)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        if not raw:
            return "[" + Path(f"/proc/{pid}/comm").read_text().strip() + "]"
    except OSError:
        return "(exited)"
    text = raw.replace(b"\0", b" ").decode(errors="replace").strip()
    return text if len(text) <= width else text[: width - 3] + "..."
