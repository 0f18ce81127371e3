"""Two py-spy raw profiles of the proxy side by side: where the time went, by library and
by function. Used to keep the before/after of the performance work in bench/results.

    .venv/bin/python bench/profile_compare.py BEFORE.txt[.gz] AFTER.txt[.gz] \\
        --before-label "..." --after-label "..." > bench/results/profile-before-after.md
"""

from __future__ import annotations

import argparse
import collections
import gzip
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.overhead.profile import summarize_text  # noqa: E402

# The libraries a proxied request passes through, in the order the table lists them.
LIBRARIES = (
    "moriio_proxy", "quart", "werkzeug", "hypercorn", "h11", "aiohttp", "multidict", "yarl",
    "asyncio", "uvloop", "logging", "json", "orjson", "prometheus_client", "copy", "uuid",
)  # fmt: skip


def _library(frame: str) -> str:
    """The library a py-spy frame ``func (path:line)`` belongs to."""
    path = frame.rsplit("(", 1)[-1]
    for name in LIBRARIES:
        if path.startswith((f"{name}/", f"{name}.py")) or f"/{name}/" in path:
            return name
    return "other"


def _read(path: Path) -> str:
    data = path.read_bytes()
    return (gzip.decompress(data) if path.suffix == ".gz" else data).decode(errors="replace")


def by_library(text: str) -> dict[str, float]:
    """Share of samples whose innermost frame is in each library (own time)."""
    own: collections.Counter[str] = collections.Counter()
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            own[_library(stack.split(";")[-1])] += int(count)
    samples = sum(own.values()) or 1
    return {name: 100 * n / samples for name, n in own.most_common()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", type=Path, help="py-spy raw profile (-f raw), .gz allowed")
    parser.add_argument("after", type=Path, help="py-spy raw profile (-f raw), .gz allowed")
    parser.add_argument("--before-label", default="before", help="what the first one is")
    parser.add_argument("--after-label", default="after", help="what the second one is")
    parser.add_argument("--top", type=int, default=20, help="functions listed per profile")
    args = parser.parse_args(argv)
    for path in (args.before, args.after):
        if not path.is_file():
            parser.error(f"{path}: no such file")
    texts = [_read(args.before), _read(args.after)]
    shares = [by_library(t) for t in texts]
    print("# Where the proxy's time went, before and after the performance work\n")
    print(f"- before: {args.before_label}\n- after: {args.after_label}\n")
    print("## Own time by library (% of samples)\n")
    print("| library | before | after |\n|---|---:|---:|")
    names = sorted(set(shares[0]) | set(shares[1]), key=lambda n: -max(s.get(n, 0) for s in shares))
    for name in names:
        print(f"| {name} | {shares[0].get(name, 0):.1f} | {shares[1].get(name, 0):.1f} |")
    for label, path in (("before", args.before), ("after", args.after)):
        tmp = summarize_text(_read(path), args.top)
        print(f"\n## Top functions by own time, {label} ({tmp['samples']} samples)\n")
        print("| # | function | own % | total % |\n|---:|---|---:|---:|")
        for i, row in enumerate(tmp["top_own"], 1):
            print(f"| {i} | `{row['function']}` | {row['own_pct']} | {row['total_pct']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
