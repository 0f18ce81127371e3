"""Fixtures of the GPU suite: the one skip line, the settings, plans and reference answers.

Every GPU test reaches the hardware through the session fixture ``gpu``. Where something is
missing it calls ``pytest.skip`` once, from one place, so pytest reports all GPU tests as
skipped under a single reason line that names every missing piece (``pytest -rs``). The plan
tests in ``test_plan.py`` use none of these fixtures and run everywhere.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.gpu.config import SKIP_PREFIX, GpuSettings, SettingsError, skip_reason
from tests.gpu.plan import LaunchPlan, NotEnoughGpus, PlanError, build_plan, scenarios
from tests.gpu.runtime import Reference


@dataclass(frozen=True)
class GpuContext:
    """What a GPU test needs: the parsed settings and where process logs go."""

    settings: GpuSettings
    log_dir: Path

    def plan(self, name: str) -> LaunchPlan:
        """The scenario's plan; a scenario the GPU lists cannot hold skips on its own."""
        try:
            return build_plan(scenarios(self.settings)[name], self.settings)
        except NotEnoughGpus as exc:
            pytest.skip(str(exc))
        except PlanError as exc:
            pytest.fail(f"cannot plan {name}: {exc}", pytrace=False)


@pytest.fixture(scope="session")
def gpu(tmp_path_factory: pytest.TempPathFactory) -> GpuContext:
    reason = skip_reason(os.environ)
    if reason is not None:
        pytest.skip(reason)
    try:
        settings = GpuSettings.from_env(os.environ)
    except SettingsError as exc:
        pytest.fail(f"GPU suite setting: {exc}", pytrace=False)
    log_dir = Path(settings.log_dir) if settings.log_dir else tmp_path_factory.mktemp("gpu-logs")
    return GpuContext(settings, log_dir)


@pytest.fixture(scope="session")
def reference(gpu: GpuContext) -> Reference:
    return Reference(gpu.settings, gpu.log_dir)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """One line for all GPU tests skipped for missing hardware, even without ``-rs``."""
    reasons = []
    for report in terminalreporter.stats.get("skipped", []):
        longrepr = getattr(report, "longrepr", None)
        if isinstance(longrepr, tuple) and len(longrepr) == 3 and SKIP_PREFIX in longrepr[2]:
            reasons.append(longrepr[2].removeprefix("Skipped: "))
    if reasons:
        terminalreporter.write_line(f"{len(reasons)} GPU tests skipped: {reasons[0]}")
