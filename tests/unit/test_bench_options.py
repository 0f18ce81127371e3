"""The benchmarks' path options: a bad one ends the run at once with one line and exit 2.

A benchmark starts processes and runs for minutes; a mistyped path must not surface as a
traceback halfway through (bench/options.py).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bench import bench_cache, bench_overhead, bench_streams, relay_events

PARSERS: dict[str, Callable[[list[str]], Any]] = {
    "bench_overhead.py": bench_overhead.parse_args,
    "bench_cache.py": bench_cache.parse_args,
    "bench_streams.py": bench_streams.parse_args,
}


@pytest.fixture
def as_run(script: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``sys.argv[0]`` as when the script is run: argparse names it in the error line."""
    monkeypatch.setattr(sys, "argv", [script])


def refused(capsys: pytest.CaptureFixture[str], run: Callable[..., Any], *args: Any) -> str:
    """The one line a refused option printed (the run must exit 2 before any work)."""
    with pytest.raises(SystemExit) as ended:
        run(*args)
    assert ended.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("script", ["bench_overhead.py", "bench_cache.py"])
def test_a_vllm_router_that_is_not_an_executable(
    script: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], as_run: None
) -> None:
    for bad in ("/bad/path", str(tmp_path)):
        err = refused(capsys, PARSERS[script], ["--vllm-router", bad])
        assert err == f"{script}: error: --vllm-router {bad}: not an executable file\n"


@pytest.mark.parametrize("script", sorted(PARSERS))
def test_an_out_folder_that_cannot_be_made(
    script: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], as_run: None
) -> None:
    taken = tmp_path / "a-file"
    taken.write_text("")
    for bad in (taken, taken / "below"):
        err = refused(capsys, PARSERS[script], ["--out", str(bad)])
        assert err.startswith(f"{script}: error: --out {bad}: cannot make the folder (")


@pytest.mark.parametrize("script", sorted(PARSERS))
def test_an_out_folder_is_made(script: str, tmp_path: Path) -> None:
    out = tmp_path / "new" / "results"
    assert PARSERS[script](["--out", str(out)]).out == out
    assert out.is_dir()


def test_a_relay_baseline_that_is_not_a_python_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    text = tmp_path / "relay.txt"
    text.write_text("")
    for bad, why in ((tmp_path / "missing.py", "no such file"), (text, "not a .py file")):
        monkeypatch.setattr(sys, "argv", ["relay_events.py", "--baseline", str(bad)])
        err = refused(capsys, relay_events.main)
        assert err == f"relay_events.py: error: --baseline {bad}: {why}\n"
