"""The HTTP side's defences: client API keys, the admin door, per-key limits and TLS.

README: Security has the threat model these serve.
"""

from .guard import CHALLENGE, AccessGuard, is_admin_path, key_problem
from .keys import KeyFileError, KeyRing, bearer
from .limits import KeyLimits, apply_max_tokens_limit, head_too_large
from .tls import server_tls, upstream_ssl_context

__all__ = [
    "CHALLENGE",
    "AccessGuard",
    "KeyFileError",
    "KeyLimits",
    "KeyRing",
    "apply_max_tokens_limit",
    "bearer",
    "head_too_large",
    "is_admin_path",
    "key_problem",
    "server_tls",
    "upstream_ssl_context",
]
