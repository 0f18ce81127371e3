"""The operator's actions on registered instances, as pure functions over a Registry.

An action is named (``drain``, ``undrain``, ``eject``, ``remove``, ``add``) and carries the
JSON body of ``POST /admin/instances/<name>``. It is parsed where it arrives (a bad body is
answered at once) and applied where the registry's truth lives: in this process, or, under
``serve --workers N``, in the supervisor, which parses it again (the worker forwards the
name and body as they came, so both ends read one format).

Each action answers an ``Outcome``: the HTTP status and a sentence, in vLLM's error shape
when it failed, so a refusal reads like every other error the proxy sends.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..protocol import (
    ROLES,
    Instance,
    RegistrationError,
    Role,
    error_body,
    parse_registration,
    split_host_port,
)
from ..registry import Registry

log = logging.getLogger("moriio_proxy.admin")

ACTIONS = ("drain", "undrain", "eject", "remove", "add")
# The longest operator ejection: a day; a longer rest is what drain or remove are for.
MAX_EJECT_SECONDS = 86_400.0


class ActionError(ValueError):
    """A request the proxy refuses; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Action:
    """One parsed action: which instance, and what to do with it."""

    name: str
    key: tuple[Role, str]  # (role, http_address), the registry's key
    seconds: float | None = None  # eject: how long; None takes --eject-seconds
    instance: Instance | None = None  # add: the instance to register
    # The JSON body as it came, which a worker forwards to its supervisor.
    body: Mapping[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Outcome:
    """What an applied action answers: the status, a sentence, and which instance."""

    status: int
    message: str
    role: str = ""
    http_address: str = ""

    @property
    def ok(self) -> bool:
        return self.status < 400

    def to_wire(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "message": self.message,
            "role": self.role,
            "http_address": self.http_address,
        }

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> Outcome:
        return cls(
            int(data["status"]),
            str(data["message"]),
            str(data.get("role", "")),
            str(data.get("http_address", "")),
        )

    def error(self) -> dict[str, Any]:
        """The refusal in vLLM's error shape."""
        return error_body(self.message, self.status)


def parse_action(name: str, body: Any) -> Action:
    """``name`` and its JSON body as an Action; ActionError (400/404) when unusable."""
    if name not in ACTIONS:
        raise ActionError(404, f"unknown action {name!r}; one of: {', '.join(ACTIONS)}")
    if not isinstance(body, Mapping):
        raise ActionError(400, "the body must be a JSON object")
    if name == "add":
        try:
            instance = parse_registration(body)
        except RegistrationError as exc:
            raise ActionError(400, f"not a usable instance: {exc}") from None
        return Action(name, instance.key, instance=instance, body=body)
    allowed = {"role", "http_address"} | ({"seconds"} if name == "eject" else set())
    unknown = sorted(str(k) for k in body if k not in allowed)
    if unknown:
        raise ActionError(
            400, f"unknown field(s) {', '.join(unknown)}; {name} takes {', '.join(sorted(allowed))}"
        )
    role = body.get("role")
    if role not in ROLES:
        raise ActionError(400, f"role must be 'P' or 'D', got {role!r}")
    address = body.get("http_address")
    if not isinstance(address, str):
        raise ActionError(400, "http_address must be a string such as '10.0.0.2:8200'")
    try:
        split_host_port(address)
    except ValueError as exc:
        raise ActionError(400, f"http_address: {exc}") from None
    seconds = _seconds(body.get("seconds")) if name == "eject" else None
    return Action(name, (role, address.strip()), seconds=seconds, body=body)


def _seconds(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ActionError(400, f"seconds must be a number, got {value!r}")
    if not 0 < value <= MAX_EJECT_SECONDS or math.isnan(value):
        raise ActionError(400, f"seconds must be above 0 and at most {MAX_EJECT_SECONDS:g}")
    return float(value)


def apply_request(registry: Registry, name: str, body: Any) -> Outcome:
    """Parse and apply in one step (the supervisor, for an action a worker forwarded)."""
    try:
        return apply_action(registry, parse_action(name, body))
    except ActionError as exc:
        return Outcome(exc.status, str(exc))


def apply_action(registry: Registry, action: Action) -> Outcome:
    """Apply ``action`` to ``registry`` (the source of truth) and say what happened."""
    role, address = action.key
    named = f"{role} instance {address}"
    if action.name == "add":
        return _add(registry, action)
    entry = registry.get(action.key)
    if entry is None:
        return Outcome(404, f"no {named} is registered", role, address)
    if action.name == "drain":
        entry.draining = True
        message = f"draining {named}: no new requests; those in flight finish"
    elif action.name == "undrain":
        entry.draining = False
        message = f"{named} takes new requests again"
    elif action.name == "eject":
        seconds = registry.eject_seconds if action.seconds is None else action.seconds
        registry.eject(entry, seconds)
        message = f"ejected {named} for {seconds:g}s"
    else:  # remove
        registry.remove(action.key, "removed by an operator")
        message = f"removed {named}; if it still sends heartbeats, it registers again"
    log.warning("admin: %s", message)
    return Outcome(200, message, role, address)


def _add(registry: Registry, action: Action) -> Outcome:
    """Register a static instance: never evicted for silence (only ``remove`` forgets it)."""
    instance = action.instance
    assert instance is not None  # parse_action sets it for "add"
    role, address = action.key
    result = registry.upsert(instance, static=True)
    if result == "conflict":
        return Outcome(
            409,
            f"{role} instance {address} uses transfer mode {instance.transfer_mode}, but "
            f"{registry.mode} is in force",
            role,
            address,
        )
    entry = registry.get(action.key)
    if entry is not None:
        entry.static = True  # it was discovered already: from now on it never expires
    verb = "added" if result == "added" else "now static:"
    message = f"{verb} {role} instance {address} ({instance.transfer_mode})"
    log.warning("admin: %s", message)
    return Outcome(201 if result == "added" else 200, message, role, address)
