"""How each setting's text (a flag, a variable, a YAML value) becomes a value: one
parser per kind, each raising ValueError with the words the error line shows."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from typing import Any

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
HEADER_NAME_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,64}")  # an RFC 9110 token


def number(text: Any) -> Any:
    """Refuse YAML booleans, which ``int()``/``float()`` would turn into 1 or 0."""
    if isinstance(text, bool):
        raise ValueError("must be a number, not a boolean")
    return text


def integer(text: Any) -> int:
    """An integer; a YAML float such as 80.5 is refused rather than truncated."""
    text = number(text)
    if isinstance(text, float) and not text.is_integer():
        raise ValueError("must be a whole number")
    return int(text)


def positive_float(text: Any) -> float:
    value = float(number(text))
    if not value > 0 or value != value or value == float("inf"):
        raise ValueError("must be a positive number of seconds")
    return value


def non_negative_float(text: Any) -> float:
    value = float(number(text))
    if not value >= 0 or value == float("inf"):
        raise ValueError("must be a number of seconds, 0 or more")
    return value


def port(text: Any) -> int:
    value = integer(text)
    if not 0 <= value <= 65535:
        raise ValueError("must be a port number from 0 to 65535")
    return value


def non_negative_int(text: Any) -> int:
    value = integer(text)
    if value < 0:
        raise ValueError("must be 0 or more")
    return value


def positive_int(text: Any) -> int:
    value = integer(text)
    if value < 1:
        raise ValueError("must be 1 or more")
    return value


def choice(*allowed: str) -> Callable[[Any], str]:
    """One of ``allowed``, in any case, returned as spelled there (``read`` is READ)."""

    def parse(text: Any) -> str:
        value = str(text).strip()
        lowered = {a.lower(): a for a in allowed}
        if value.lower() not in lowered:
            raise ValueError(f"must be one of {', '.join(allowed)}")
        return lowered[value.lower()]

    return parse


def ratio(text: Any) -> float:
    value = float(number(text))
    if not value >= 1 or value == float("inf"):
        raise ValueError("must be a number, 1 or more")
    return value


def header_name(text: Any) -> str:
    value = str(text).strip()
    if not HEADER_NAME_RE.fullmatch(value):
        raise ValueError("must be an HTTP header name such as X-Session-ID")
    return value


def networks(text: Any) -> tuple[Network, ...]:
    items = text if isinstance(text, (list, tuple)) else str(text).split(",")
    try:
        return tuple(ipaddress.ip_network(str(i).strip(), strict=False) for i in items if i)
    except ValueError as exc:
        raise ValueError(f"must be comma-separated networks like 10.0.0.0/8 ({exc})") from None


def string(text: Any) -> str:
    if not isinstance(text, (str, int, float)) or isinstance(text, bool):
        raise ValueError("must be a string")
    return str(text).strip()


def secret(text: Any) -> str:
    """A key or token as a client sends it after ``Bearer ``: printable ASCII, no spaces."""
    value = string(text)
    if not value or not all("!" <= c <= "~" for c in value):
        raise ValueError("must be printable ASCII without spaces")
    return value


def secret_list(text: Any) -> tuple[str, ...]:
    """Keys from a repeated flag (a list), the environment or the file (comma-separated)."""
    items = text if isinstance(text, (list, tuple)) else str(text).split(",")
    return tuple(secret(i) for i in items if str(i).strip())


def optional_secret(text: Any) -> str:
    return secret(text) if str(text).strip() else ""


def switch(text: Any) -> bool:
    """A switch: given on the command line it is True; from the environment or the file
    it takes the usual words for yes and no."""
    if isinstance(text, bool):
        return text
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


def non_negative_rate(text: Any) -> float:
    value = float(number(text))
    if not value >= 0 or value == float("inf"):
        raise ValueError("must be a number of requests per second, 0 or more")
    return value


def host(text: Any) -> str:
    value = str(text).strip()
    if not value:
        raise ValueError("must not be empty")
    return value
