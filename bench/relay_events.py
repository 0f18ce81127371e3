"""What the relay costs per SSE event: a decode stream through ``relay.Relay``, no network.

Every event of every streamed answer passes through ``Relay`` (framing, id scrubbing, and
from vLLM 0.33 on removing ``kv_transfer_params`` from each chunk), so its per-event cost
is paid dozens of times per request. This times a realistic 64-token stream, one event
per body read as aiohttp usually delivers them, in the two shapes vLLM sends: 0.32's
chunks (no ``kv_transfer_params``) and 0.33's (``"kv_transfer_params":null`` in every
chunk), for completions and chat.

    .venv/bin/python bench/relay_events.py            # about 10 s
    .venv/bin/python bench/relay_events.py --streams 2000 --repeat 7
    git show main:moriio_proxy/relay.py > /tmp/relay_main.py
    .venv/bin/python bench/relay_events.py --baseline /tmp/relay_main.py

With ``--baseline`` another version of ``relay.py`` is timed too, its runs interleaved with
this one's, so both see the same machine load (a shared machine drifts between runs).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import sys
import time
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import options  # noqa: E402
from moriio_proxy import relay as current  # noqa: E402

INTERNAL = (
    "___prefill_addr_host:10.0.0.1,handshake:6301,notify:61005"
    "___decode_addr_host:10.0.0.2,handshake:7301,notify:7501_" + "ab" * 16
)
TOKENS = 64


def _chunk(endpoint: str, text: str, finish: str | None, version: str) -> bytes:
    """One vLLM chunk, serialised compactly as pydantic's model_dump_json does."""
    if endpoint == "chat":
        body: dict[str, object] = {
            "id": f"chatcmpl-{INTERNAL}",
            "object": "chat.completion.chunk",
            "created": 1767225600,
            "model": "Qwen/Qwen3-0.6B",
            "choices": [
                {
                    "index": 0,
                    "delta": {"content": text},
                    "logprobs": None,
                    "finish_reason": finish,
                    "stop_reason": None,
                }
            ],
        }
    else:
        body = {
            "id": f"cmpl-{INTERNAL}",
            "object": "text_completion",
            "created": 1767225600,
            "model": "Qwen/Qwen3-0.6B",
            "choices": [
                {
                    "index": 0,
                    "text": text,
                    "logprobs": None,
                    "finish_reason": finish,
                    "stop_reason": None,
                }
            ],
        }
    if version == "0.33":
        body["kv_transfer_params"] = None
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


def stream(endpoint: str, version: str) -> list[bytes]:
    """The body pieces of one answer: a chunk per token, then ``[DONE]``."""
    events = []
    if endpoint == "chat":  # the role chunk has no kv_transfer_params in either version
        role = {
            "id": f"chatcmpl-{INTERNAL}",
            "object": "chat.completion.chunk",
            "created": 1767225600,
            "model": "Qwen/Qwen3-0.6B",
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}],
        }
        events.append(b"data: " + json.dumps(role, separators=(",", ":")).encode() + b"\n\n")
    for i in range(TOKENS):
        finish = "length" if i == TOKENS - 1 else None
        events.append(_chunk(endpoint, f" w{i}", finish, version))
    events.append(b"data: [DONE]\n\n")
    return events


class _Body:
    __slots__ = ("_i", "_pieces")

    def __init__(self, pieces: list[bytes]) -> None:
        self._pieces = pieces
        self._i = 0

    async def read(self) -> bytes:
        i = self._i
        if i == len(self._pieces):
            return b""
        self._i = i + 1
        return self._pieces[i]


async def _relay_all(module: ModuleType, pieces: list[bytes], endpoint: str, n: int) -> None:
    for _ in range(n):
        relay = module.Relay(_Body(pieces), module.Scrubber(INTERNAL, "pub", endpoint))
        await relay.prime()
        async for _event in relay:
            pass


def measure(
    modules: list[ModuleType], endpoint: str, version: str, streams: int, repeat: int
) -> list[float]:
    """Microseconds per relayed body piece for each module: the best of ``repeat`` runs
    (the least disturbed by other work on the machine), the modules' runs interleaved."""
    pieces = stream(endpoint, version)
    loop = asyncio.new_event_loop()
    best = [float("inf")] * len(modules)
    try:
        for module in modules:
            loop.run_until_complete(_relay_all(module, pieces, endpoint, 20))  # warm-up
        for _ in range(repeat):
            for i, module in enumerate(modules):
                started = time.perf_counter()
                loop.run_until_complete(_relay_all(module, pieces, endpoint, streams))
                took = (time.perf_counter() - started) / (streams * len(pieces))
                best[i] = min(best[i], took * 1e6)
    finally:
        loop.close()
    return best


def load_baseline(path: str) -> ModuleType:
    """Another relay.py, imported as a sibling of this one (its relative imports resolve
    against today's moriio_proxy package)."""
    spec = importlib.util.spec_from_file_location("moriio_proxy._relay_baseline", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=1000, help="streams per run")
    parser.add_argument("--repeat", type=int, default=5, help="runs; the best is shown")
    parser.add_argument("--baseline", metavar="FILE", help="another relay.py to time too")
    args = parser.parse_args()
    if args.baseline:
        options.check_file(parser, "--baseline", args.baseline, ".py")
    modules = [current] + ([load_baseline(args.baseline)] if args.baseline else [])
    header = f"{'endpoint':<12}{'vLLM':<6}{'events':>7}{'us/event':>10}"
    print(header + (f"{'baseline':>10}" if args.baseline else ""))
    for endpoint in ("completions", "chat"):
        for version in ("0.32", "0.33"):
            costs = measure(modules, endpoint, version, args.streams, args.repeat)
            n = len(stream(endpoint, version))
            print(f"{endpoint:<12}{version:<6}{n:>7}" + "".join(f"{c:>10.2f}" for c in costs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
