"""What a user sees on the terminal from start to Ctrl-C: each line once, warnings only
when something deserves one, and the demo's curl line working the moment it is printed."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.harness import free_port

ROOT = Path(__file__).resolve().parents[2]
SERVING = re.compile(r"serving OpenAI on http://127\.0\.0\.1:(\d+)")
START_TIMEOUT = 60  # a cold interpreter on a loaded 2-core machine


def start(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "moriio_proxy", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


def read_until(stream, pattern: str, proc: subprocess.Popen[str]) -> list[str]:
    lines: list[str] = []
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        line = stream.readline()
        assert line, "".join(lines) + proc.stderr.read()
        lines.append(line)
        if re.search(pattern, line):
            return lines
    raise AssertionError(f"no {pattern!r} in:\n{''.join(lines)}")


def stop(proc: subprocess.Popen[str], sig: signal.Signals) -> str:
    """Send ``sig``, return the rest of stderr; the process must exit 0.

    The rest is read through ``proc.stderr`` itself: ``communicate()`` reads the pipe's
    descriptor and would miss lines ``read_until``'s readline already buffered (a line
    logged right after the one it waited for).
    """
    proc.send_signal(sig)
    try:
        proc.wait(timeout=30)  # an idle serve logs a few lines: the pipe cannot fill
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    rest = proc.stderr.read()
    assert proc.returncode == 0, rest
    return rest


def serve_output(*args: str) -> str:
    """Everything an idle ``serve`` logs from start to SIGTERM."""
    proc = start("serve", "--host", "127.0.0.1", "--port", "0", "--discovery-port", "0", *args)
    head = read_until(proc.stderr, SERVING.pattern, proc)
    return "".join(head) + stop(proc, signal.SIGTERM)


def warnings(log: str) -> list[str]:
    return [line for line in log.splitlines() if " WARNING " in line]


def test_the_demo_banner_comes_when_a_completion_works_and_ctrl_c_is_quiet():
    port = free_port(21000 + os.getpid() % 5000)
    discovery = free_port(port + 1)
    proc = start("demo", "--port", str(port), "--discovery-port", str(discovery))
    try:
        read_until(proc.stdout, "curl", proc)
        # No polling: once the banner is out, the first request is served.
        body = {"model": "sim-model", "prompt": "The capital of France is", "max_tokens": 8}
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as resp:
            assert json.loads(resp.read())["choices"][0]["finish_reason"] == "length"
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    log = stop(proc, signal.SIGINT)
    assert "INFO moriio_proxy: shutting down: nothing in flight" in log
    assert warnings(log) == []


def test_an_idle_serve_says_where_it_serves_once_and_stops_at_info():
    log = serve_output("--discovery-host", "127.0.0.1")
    assert len(SERVING.findall(log)) == 1
    assert "Running on" not in log  # Hypercorn's own line repeated ours, twice
    assert "INFO moriio_proxy: shutting down: nothing in flight" in log
    assert warnings(log) == []


def test_discovery_left_open_by_default_is_a_warning():
    log = serve_output()  # --host 127.0.0.1, --discovery-host not given: 0.0.0.0
    assert "discovery listening on tcp://0.0.0.0:" in log
    assert "(every interface)" in log
    (warning,) = warnings(log)
    assert "--discovery-host (default 0.0.0.0) is separate from --host" in warning
    assert "--discovery-allow" in warning


def test_discovery_restricted_by_sources_or_chosen_by_the_operator_is_not_a_warning():
    assert warnings(serve_output("--discovery-allow", "10.0.0.0/8")) == []
    assert warnings(serve_output("--discovery-host", "0.0.0.0")) == []


def test_workers_print_the_serving_line_once_and_no_hypercorn_line():
    log = serve_output("--discovery-host", "127.0.0.1", "--workers", "2")
    assert re.findall(r"serving OpenAI on \S+ with 2 workers", log)
    assert len(SERVING.findall(log)) == 1
    assert "Running on" not in log
    assert log.count("shutting down: nothing in flight") == 2  # one per worker
    assert warnings(log) == []
