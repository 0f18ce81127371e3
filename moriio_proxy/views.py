"""What ``GET /admin/instances`` serves, as types: written by the app, read by ``check``.

The endpoint is a contract between the proxy and whoever inspects it, often a ``check`` of
another version run from a laptop. Both sides use these dataclasses, so a key cannot be
renamed on one side only. ``to_json`` and ``from_json`` are derived from the dataclass fields:
adding a field is adding one annotated attribute here (with a default, so that answers of
older proxies, which lack it, still parse).

``from_json`` is tolerant where versions differ (unknown keys are ignored, an integer is
accepted where a float is expected) and strict about the rest: a wrong type or a missing
field raises ``ViewError`` naming the field, so a reader reports a malformed answer in one
sentence instead of failing somewhere later on a ``KeyError``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, TypeVar, Union

from .protocol import Role, TransferMode

InstanceState = Literal["healthy", "stale", "ejected", "draining"]

V = TypeVar("V", bound="JsonView")


class ViewError(ValueError):
    """An answer that does not have the documented shape; the message names the field."""


class JsonView:
    """A frozen dataclass that converts to and from its JSON object, field by field.

    Supported field types: ``str``, ``int``, ``float``, ``bool``, ``Literal`` of strings,
    ``X | None``, ``tuple[X, ...]`` (a JSON array) and another ``JsonView``.
    """

    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]

    def to_json(self) -> dict[str, Any]:
        """The JSON object, keys in field order (the order the endpoint has always used)."""
        return {f.name: _to_json(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_json(cls: type[V], data: Any, where: str = "") -> V:
        """Parse and validate ``data``; ``where`` prefixes the field names in errors."""
        if not isinstance(data, dict):
            raise ViewError(f"{where or 'answer'}: expected a JSON object, got {_show(data)}")
        hints = typing.get_type_hints(cls)
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            path = f"{where}.{f.name}" if where else f.name
            if f.name in data:
                values[f.name] = _parse(data[f.name], hints[f.name], path)
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ViewError(f"{path} is missing")
        return cls(**values)


@dataclass(frozen=True)
class InstanceView(JsonView):
    """One registered instance as the proxy sees it."""

    role: Role
    http_address: str  # HOST:PORT of its OpenAI server, as the instance announced it
    zmq_address: str  # the KV handshake address the request-id sandwich embeds
    transfer_mode: TransferMode
    dp_size: int
    tp_size: int
    static: bool  # from the configuration, not discovered; never goes stale
    age_seconds: float
    seconds_since_heartbeat: float | None  # None for static instances
    # One of InstanceState from this proxy; typed as str so that a newer proxy's new state
    # reaches the reader (which reports it) instead of making the whole answer malformed.
    state: str
    consecutive_failures: int
    inflight: int
    inflight_by_dp_rank: tuple[int, ...]
    # What the instance's GET /version answered; None while unknown (pairing then treats it
    # as the oldest supported release) and from proxies that predate the field.
    vllm_version: str | None = None
    # Why the proxy pairs it with no live instance of the other role (TP sizes, versions:
    # docs/protocol.md §8.2, §10), or None when some pair works or there is no peer.
    unpaired: str | None = None
    # How the proxy reaches it: "https" under --upstream-scheme https or for a static
    # instance listed with https://; "http" from proxies that predate the field.
    scheme: str = "http"


@dataclass(frozen=True)
class AdminInstances(JsonView):
    """The whole answer of ``GET /admin/instances``."""

    transfer_mode: TransferMode | None  # None until an instance fixes it (mode "auto")
    instances: tuple[InstanceView, ...]


def _to_json(value: Any) -> Any:
    if isinstance(value, JsonView):
        return value.to_json()
    if isinstance(value, tuple):
        return [_to_json(v) for v in value]
    return value


def _parse(value: Any, hint: Any, path: str) -> Any:
    """``value`` checked against the type ``hint``; ViewError naming ``path`` otherwise."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        if value in typing.get_args(hint) and isinstance(value, str):
            return value
        allowed = ", ".join(repr(a) for a in typing.get_args(hint))
        raise ViewError(f"{path}: expected one of {allowed}, got {_show(value)}")
    if origin in (Union, types.UnionType):
        arms = typing.get_args(hint)
        if value is None and type(None) in arms:
            return None
        others = [a for a in arms if a is not type(None)]
        if len(others) != 1:
            raise TypeError(f"{path}: a view field may only be X or X | None, not {hint!r}")
        return _parse(value, others[0], path)
    if origin is tuple:
        item, _ = typing.get_args(hint)  # tuple[X, ...]
        if not isinstance(value, list):
            raise ViewError(f"{path}: expected a list, got {_show(value)}")
        return tuple(_parse(v, item, f"{path}[{i}]") for i, v in enumerate(value))
    if isinstance(hint, type) and issubclass(hint, JsonView):
        return hint.from_json(value, path)
    return _scalar(value, hint, path)


def _scalar(value: Any, hint: Any, path: str) -> Any:
    # bool is an int to Python, never to this contract.
    if hint is bool and isinstance(value, bool):
        return value
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is str and isinstance(value, str):
        return value
    if hint not in (bool, int, float, str):
        raise TypeError(f"{path}: a view field of unsupported type {hint!r}")
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    raise ViewError(f"{path}: expected {names[hint]}, got {_show(value)}")


def _show(value: Any) -> str:
    text = "null" if value is None else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
