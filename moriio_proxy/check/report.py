"""What ``check`` prints: one verdict per check, then a summary; as text or as JSON.

A verdict that is not OK always carries the next step (``hint``): the point of ``check`` is
to tell a person what to do, not only that something is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Status = Literal["OK", "WARN", "FAIL"]


@dataclass(frozen=True)
class CheckResult:
    """One verdict line: what was checked, how it went, and what to do about it."""

    name: str
    status: Status
    message: str
    hint: str = ""  # the next step; empty when OK
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "message": self.message,
            "hint": self.hint or None,
            "details": self.details,
        }


def ok(name: str, message: str, details: dict[str, Any] | None = None) -> CheckResult:
    return CheckResult(name, "OK", message, "", details or {})


def warn(name: str, message: str, hint: str, details: dict[str, Any] | None = None) -> CheckResult:
    return CheckResult(name, "WARN", message, hint, details or {})


def fail(name: str, message: str, hint: str, details: dict[str, Any] | None = None) -> CheckResult:
    return CheckResult(name, "FAIL", message, hint, details or {})


@dataclass
class Report:
    """All verdicts of one run; ``aborted`` when the proxy itself could not be reached."""

    url: str
    results: list[CheckResult]
    elapsed: float
    aborted: bool = False

    @property
    def status(self) -> Status:
        statuses = {r.status for r in self.results}
        if "FAIL" in statuses:
            return "FAIL"
        return "WARN" if "WARN" in statuses else "OK"

    @property
    def exit_code(self) -> int:
        return 1 if self.status == "FAIL" else 0

    def by_name(self, name: str) -> CheckResult:
        """The (first) result of a check; tests and scripts look verdicts up by name."""
        for result in self.results:
            if result.name == name:
                return result
        raise KeyError(name)

    def summary(self) -> str:
        fails = [r.name for r in self.results if r.status == "FAIL"]
        warns = [r.name for r in self.results if r.status == "WARN"]
        oks = sum(r.status == "OK" for r in self.results)
        counts = f"{oks} OK, {len(warns)} WARN, {len(fails)} FAIL in {self.elapsed:.1f}s"
        if fails:
            return (
                f"summary: FAIL ({counts}) for {self.url}: fix {', '.join(fails)} "
                "(the first FAIL line first: later ones often follow from it)"
            )
        if warns:
            return (
                f"summary: OK with warnings ({counts}) for {self.url}: nothing failed; "
                f"look at {', '.join(warns)}"
            )
        return f"summary: OK ({counts}) for {self.url}: the deployment serves completions"

    def to_text(self) -> str:
        """One line per check, then the summary; a single line when the proxy is down."""
        width = max((len(r.name) for r in self.results), default=0)
        lines = [_line(r, width) for r in self.results]
        if not self.aborted:
            lines.append(self.summary())
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "status": self.status,
            "exit_code": self.exit_code,
            "elapsed_seconds": round(self.elapsed, 3),
            "summary": self.summary(),
            "checks": [r.to_dict() for r in self.results],
        }


def _line(result: CheckResult, width: int) -> str:
    text = f"{result.status:<4}  {result.name:<{width}}  {result.message}"
    if result.hint:
        text += f" -> next: {result.hint}"
    return text.replace("\r", " ").replace("\n", " ")
