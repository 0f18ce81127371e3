"""``Option``: one setting's flag, variable, parser and help line, declared once."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .parsers import choice

ENV_PREFIX = "MORIIO_PROXY_"


@dataclass(frozen=True)
class Option:
    """One setting: its flag, how to parse it, and what ``serve --help`` says of it.

    ``choices``: the values a choice setting takes (any case; see ``choice_option``).
    ``default_text``: the default in words, for a default whose value says nothing (an
    empty string or list that the proxy fills in at run time).
    """

    name: str
    parse: Callable[[Any], Any]
    help: str
    choices: tuple[str, ...] = ()
    default_text: str = ""
    # A switch takes no value on the command line; a repeated flag may be given many times;
    # a secret's value is never echoed in an error message.
    switch: bool = False
    repeated: bool = False
    secret: bool = False
    metavar: str = ""  # the value's name in --help (default: the last word of the name)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    def help_line(self, default: Any) -> str:
        """The help text: what it does, the values it takes, its variable, its default."""
        shown = self.default_text or _show(default)
        if not shown:
            raise ValueError(f"{self.flag}: the default needs default_text to be shown")
        choices = f"; one of {', '.join(self.choices)} (any case)" if self.choices else ""
        return f"{self.help}{choices} [env {self.env}] (default: {shown})"


def choice_option(name: str, choices: tuple[str, ...], help: str) -> Option:
    """A setting that takes one of ``choices``, in any case (``read`` is READ)."""
    return Option(name, choice(*choices), help, choices=choices)


def _show(value: Any) -> str:
    """A default as it would be typed: 300 for 300.0, lists comma-separated."""
    if isinstance(value, tuple):
        return ",".join(_show(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)
