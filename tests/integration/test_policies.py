"""Routing policies across processes: what must not depend on the interpreter running them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from moriio_proxy.policies import make_prefill_policy
from tests.harness.entries import entry

ROOT = Path(__file__).resolve().parents[2]


def test_session_owners_are_the_same_in_every_process():
    # Python's own str hash is salted per process; two proxy replicas (or workers) must
    # still agree on where a session lives.
    program = (
        "from moriio_proxy.policies import make_prefill_policy\n"
        "from tests.harness.entries import entry\n"
        "p = make_prefill_policy('session')\n"
        "c = [entry(n, dp_size=2) for n in range(4)]\n"
        "print([(t.entry.instance.http_address, t.rank) for t in "
        "(p.owner(c, f's{i}') for i in range(50))])\n"
    )
    outputs = {
        subprocess.run(
            [sys.executable, "-c", program],
            env={"PYTHONHASHSEED": seed, "PYTHONPATH": str(ROOT)},
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in ("1", "2")
    }
    assert len(outputs) == 1
    policy = make_prefill_policy("session")
    candidates = [entry(n, dp_size=2) for n in range(4)]
    owners = (policy.owner(candidates, f"s{i}") for i in range(50))  # type: ignore[attr-defined]
    here = [(t.entry.instance.http_address, t.rank) for t in owners]
    assert outputs.pop().strip() == str(here)
