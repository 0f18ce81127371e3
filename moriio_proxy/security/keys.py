"""Client API keys: the set a request's ``Authorization`` header is checked against.

The check runs on every generation request, so everything it can be done ahead is: each
key is kept as the whole header value a client sends (``Bearer KEY``, spelled as vLLM's
own ``--api-key`` check spells it), and a request costs one ``hmac.compare_digest`` per
configured key on the header bytes Hypercorn already holds: no decoding, no slicing (the
scheme written in another case, ``bearer``, is rebuilt once). The
comparison takes the same time wherever the first differing byte is, and every key is
compared (no early exit), so timing tells a caller nothing about how close a guess came.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger("moriio_proxy")


class KeyFileError(ValueError):
    """The keys file cannot be read or holds a line that is not a key."""


def bearer(secret: str) -> bytes:
    """The ``Authorization`` header value that carries ``secret``."""
    return b"Bearer " + secret.encode("ascii")


def canonical(authorization: bytes) -> bytes:
    """The header value with its scheme spelled ``Bearer``: the scheme is case-insensitive
    (RFC 9110 §11.1; vLLM accepts ``bearer`` too). The usual spelling costs one prefix
    test; another one is rebuilt."""
    if authorization.startswith(b"Bearer ") or authorization[:7].lower() != b"bearer ":
        return authorization
    return b"Bearer " + authorization[7:]


def read_key_file(path: str) -> tuple[str, ...]:
    """The keys in ``path``: one a line, blank lines and ``#`` comments skipped.

    Errors name the file and the line number, never the line: it may be a key.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise KeyFileError(f"--api-key-file: cannot read {path}: {reason}") from None
    keys = []
    for number, line in enumerate(text.splitlines(), 1):
        key = line.split("#", 1)[0].strip()
        if not key:
            continue
        if not all("!" <= c <= "~" for c in key):
            raise KeyFileError(
                f"--api-key-file: {path} line {number}: a key is printable ASCII without spaces"
            )
        keys.append(key)
    return tuple(keys)


class KeyRing:
    """The client keys in force: the fixed ones (flags, environment, config file) and those
    of the keys file, which ``reload`` reads again (SIGHUP).

    A reload swaps one tuple: a request being checked sees the old set or the new one,
    never a half-read file, and a file that fails to read keeps the keys in force.
    ``enabled`` is fixed at startup: a keys file that is configured but empty locks every
    client out rather than opening the proxy.
    """

    def __init__(self, keys: Iterable[str] = (), file: str = "") -> None:
        self._fixed = tuple(keys)
        self._file = file
        self.enabled = bool(self._fixed or file)
        self._expected: tuple[bytes, ...] = ()
        self._load()  # the first read's error is the operator's: let it stop startup

    def __len__(self) -> int:
        return len(self._expected)

    def _load(self) -> None:
        from_file = read_key_file(self._file) if self._file else ()
        self._expected = tuple(bearer(k) for k in dict.fromkeys(self._fixed + from_file))

    def reload(self) -> bool:
        """Read the keys file again; on failure log why and keep the keys in force."""
        if not self._file:
            return True
        try:
            self._load()
        except KeyFileError as exc:
            log.error("%s; keeping the %d keys in force", exc, len(self._expected))
            return False
        log.info("reloaded the client API keys: %d in force", len(self._expected))
        return True

    def match(self, authorization: bytes | None) -> bytes | None:
        """The key entry ``authorization`` (a raw header value) carries, or None.

        The entry returned is a stable name for the key (per-key limits count by it); it
        is never logged.
        """
        if authorization is None:
            return None
        if not authorization.startswith(b"Bearer "):  # inlined: the usual case skips a call
            authorization = canonical(authorization)
        found = None
        for expected in self._expected:
            if hmac.compare_digest(authorization, expected):
                found = expected
        return found
