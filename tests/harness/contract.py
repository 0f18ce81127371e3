"""Wire shapes pinned here, apart from the code that produces them, so that a change to
that code cannot silently change them too."""

from __future__ import annotations

# The keys /admin/instances has always served for each instance, in its order: scripts,
# dashboards and ``moriio-proxy check`` read them.
INSTANCE_KEYS = [
    "role",
    "http_address",
    "zmq_address",
    "transfer_mode",
    "dp_size",
    "tp_size",
    "static",
    "age_seconds",
    "seconds_since_heartbeat",
    "state",
    "consecutive_failures",
    "inflight",
    "inflight_by_dp_rank",
    "vllm_version",
    "unpaired",
    "scheme",
]
