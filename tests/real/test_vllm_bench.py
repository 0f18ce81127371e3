"""``vllm bench serve`` (vLLM's own load generator) through the proxy must see no error."""

from __future__ import annotations

import asyncio
import os
import re

import pytest

from tests.harness import running_proxy
from tests.real.engines import MODEL, REPO, REQUIRED, VENV, missing_reason

REASON = missing_reason()
if REASON is not None:
    if REQUIRED:
        raise RuntimeError(f"MORIIO_REAL_VLLM=required but {REASON}")
    pytest.skip(REASON, allow_module_level=True)

PROMPTS = 64


@pytest.mark.real_vllm
@pytest.mark.parametrize("mode", ["READ", "WRITE"])
async def test_vllm_bench_serve_completes_without_errors(mode: str, tmp_path):
    async with running_proxy(log_level="warning") as proxy:
        await proxy.add_sim("P", mode=mode)
        await proxy.add_sim("D", mode=mode)
        await proxy.wait_registered(1, 1)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
        bench = await asyncio.create_subprocess_exec(
            str(VENV / "bin" / "python"),
            str(REPO / "scripts" / "real_vllm" / "bench_serve.py"),
            "--backend", "vllm", "--base-url", proxy.url, "--endpoint", "/v1/completions",
            "--model", "sim-model", "--tokenizer", str(MODEL),
            "--dataset-name", "random", "--random-input-len", "32",
            "--random-output-len", "16", "--num-prompts", str(PROMPTS),
            "--max-concurrency", "16",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
            cwd=tmp_path,
        )  # fmt: skip
        output = (await asyncio.wait_for(bench.communicate(), 300))[0].decode(errors="replace")
    assert bench.returncode == 0, output[-3000:]
    assert re.search(rf"Successful requests:\s+{PROMPTS}\b", output), output[-3000:]
    assert re.search(r"Failed requests:\s+0\b", output), output[-3000:]
