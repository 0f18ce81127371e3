"""``moriio-proxy check URL``: is this P/D deployment usable, and if not, what to do next.

A P/D deployment fails in ways that look alike from a client (a 503, a hang, a 502), but
each has a different fix: an instance that never registered (no ``proxy_ip``), a
``read_mode`` mismatch, DP>1 together with TP>1 (vLLM 0.32 port collision), TP sizes that do
not divide, an instance the proxy still lists whose server is gone. ``check`` asks the
proxy's own HTTP API (``/health``, ``/admin/instances``, ``/metrics``, ``/v1/models``,
``/ready``), probes each registered instance directly, and sends one small completion
through the proxy, then prints one line per check with ``OK``/``WARN``/``FAIL`` and, for
anything not OK, the next step to take.

Exit status: 0 when nothing FAILed (warnings allowed), 1 when a check FAILed (including an
unreachable proxy, which prints a single line), 2 for bad usage. Every HTTP call is bounded
by a timeout, so ``check`` always finishes. It only reads, except for the one completion.

The parts: ``probes`` (the bounded HTTP calls and how their failures are classified),
``answers`` (what an answer says, no I/O), ``verdicts`` (pure functions from answers and
instance views to results), ``report`` (results, text and JSON), ``runner`` (one run, in
order) and ``command`` (the CLI subcommand). The instance list is read through
``moriio_proxy.views``, the contract the app writes it with.
"""

from __future__ import annotations

from .command import add_parser, main
from .probes import normalize_url
from .report import CheckResult, Report
from .runner import run_check

__all__ = ["CheckResult", "Report", "add_parser", "main", "normalize_url", "run_check"]
