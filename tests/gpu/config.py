"""Settings of the GPU suite (``MORIIO_GPU_*`` variables) and what this host lacks to run it.

The suite runs only where real hardware is: AMD GPUs (``/dev/kfd``), ROCm, an RDMA NIC,
vLLM with MoRI-IO and a model to serve. Everywhere else every GPU test must skip with one
line that names each missing piece, so a person on a cluster sees at once what to fix and
a CI run without GPUs stays green. The probes take a filesystem root and injectable tool
and import checks so that the skip reasons themselves are tested on any machine
(``tests/gpu/test_plan.py``).
"""

from __future__ import annotations

import ipaddress
import os
import shlex
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

README = "tests/gpu/README.md"
SKIP_PREFIX = "GPU P/D suite cannot run here"

# Every variable the suite reads, with what it means (the README documents the same list;
# test_plan checks the two agree).
ENV_DOC: dict[str, str] = {
    "MORIIO_GPU_MODEL": "model name or path every instance serves (required: unset skips the "
    "suite)",
    "MORIIO_GPU_HOST_IP": "IP of this node, where the proxy, prefill and reference run and "
    "that instances use for MoRI-IO (default: the address of the default route)",
    "MORIIO_GPU_PREFILL_HOST_IP": "prefill's IP (default: MORIIO_GPU_HOST_IP)",
    "MORIIO_GPU_DECODE_HOST_IP": "decode's IP; another node's IP needs MORIIO_GPU_DECODE_SSH "
    "(default: MORIIO_GPU_HOST_IP)",
    "MORIIO_GPU_DECODE_SSH": "ssh destination (user@host) to start decode on a second node; "
    "unset: decode runs here",
    "MORIIO_GPU_REMOTE_REPO": "this repository's path on the decode node (default: the same "
    "path as here)",
    "MORIIO_GPU_PREFILL_GPUS": "GPU indexes prefill instances take, in order (default 0,1,2,3)",
    "MORIIO_GPU_DECODE_GPUS": "GPU indexes decode takes (default 4,5,6,7)",
    "MORI_DEVICE_NIC": "MoRI's own variable: the RDMA device to use (e.g. mlx5_0), passed to "
    "every instance; must exist under /sys/class/infiniband",
    "MORIIO_GPU_BACKEND": "rdma (default) or xgmi (P and D on this node only)",
    "MORIIO_GPU_MODE": "READ (default) or WRITE for the DP, TP and failover scenarios (the "
    "1P1D scenarios run both)",
    "MORIIO_GPU_DP": "prefill DP size of the dp-prefill scenario (default 2)",
    "MORIIO_GPU_TP": "TP size of prefill and decode in the tp scenario (default 2)",
    "MORIIO_GPU_PORT_BASE": "ports are derived from it: proxy +1/+2, prefill +10/+100/+200, "
    "second prefill +11/+300/+400, decode +20/+500/+600, reference +30 (default 18000)",
    "MORIIO_GPU_BLOCK_SIZE": "--block-size of every instance (default 16)",
    "MORIIO_GPU_VLLM": "the vllm executable (default vllm; an absolute path valid on every node "
    "for two nodes)",
    "MORIIO_GPU_VLLM_ARGS": "extra `vllm serve` arguments for every instance, e.g. "
    "'--max-model-len 8192 --gpu-memory-utilization 0.85'",
    "MORIIO_GPU_PYTHON": "the Python vLLM runs under, for the `import mori.io` probe (default: "
    "python3 next to the vllm executable, else this Python)",
    "MORIIO_GPU_STARTUP_TIMEOUT": "seconds to wait for an instance to load (default 1800)",
    "MORIIO_GPU_REQUEST_TIMEOUT": "seconds per request through the proxy (default 120)",
    "MORIIO_GPU_MAX_TOKENS": "tokens generated per test prompt (default 32)",
    "MORIIO_GPU_GREEDY_MIN_MATCH": "fraction of prompts whose greedy text must equal the "
    "non-disaggregated reference exactly (default 1.0)",
    "MORIIO_GPU_LOG_DIR": "where each process's log goes (default: a pytest temporary "
    "directory, printed on failure)",
}


class SettingsError(ValueError):
    """A MORIIO_GPU_* variable is set to something unusable (names the variable)."""


@dataclass(frozen=True)
class GpuSettings:
    """The whole suite's configuration, parsed once from the environment."""

    model: str | None
    prefill_host_ip: str
    decode_host_ip: str
    decode_ssh: str | None
    remote_repo: str | None
    prefill_gpus: tuple[int, ...]
    decode_gpus: tuple[int, ...]
    nic: str | None
    backend: str
    mode: str
    dp: int
    tp: int
    port_base: int
    block_size: int
    vllm: str
    vllm_args: tuple[str, ...]
    python: str | None
    startup_timeout: float
    request_timeout: float
    max_tokens: int
    greedy_min_match: float
    log_dir: str | None

    @property
    def proxy_ip(self) -> str:
        """The proxy runs where the test runs, next to prefill."""
        return self.prefill_host_ip

    @property
    def two_nodes(self) -> bool:
        return self.prefill_host_ip != self.decode_host_ip

    @classmethod
    def from_env(
        cls, env: Mapping[str, str], detect_ip: Callable[[], str] | None = None
    ) -> GpuSettings:
        """Parse ``env``; raise SettingsError naming the first unusable variable."""
        get = _Reader(env)
        host = get.ip("MORIIO_GPU_HOST_IP") or (detect_ip or detect_host_ip)()
        prefill_host = get.ip("MORIIO_GPU_PREFILL_HOST_IP") or host
        decode_host = get.ip("MORIIO_GPU_DECODE_HOST_IP") or host
        decode_ssh = get.text("MORIIO_GPU_DECODE_SSH")
        if decode_host != prefill_host and not decode_ssh:
            raise SettingsError(
                f"MORIIO_GPU_DECODE_HOST_IP={decode_host} is another node than prefill "
                f"({prefill_host}): set MORIIO_GPU_DECODE_SSH so the suite can start decode there"
            )
        backend = get.choice("MORIIO_GPU_BACKEND", ("rdma", "xgmi"), "rdma")
        if backend == "xgmi" and decode_host != prefill_host:
            raise SettingsError("MORIIO_GPU_BACKEND=xgmi needs prefill and decode on one node")
        dp = get.integer("MORIIO_GPU_DP", 2, 1, 64)
        tp = get.integer("MORIIO_GPU_TP", 2, 1, 64)
        return cls(
            model=get.text("MORIIO_GPU_MODEL"),
            prefill_host_ip=prefill_host,
            decode_host_ip=decode_host,
            decode_ssh=decode_ssh,
            remote_repo=get.text("MORIIO_GPU_REMOTE_REPO"),
            prefill_gpus=get.gpus("MORIIO_GPU_PREFILL_GPUS", (0, 1, 2, 3)),
            decode_gpus=get.gpus("MORIIO_GPU_DECODE_GPUS", (4, 5, 6, 7)),
            nic=get.text("MORI_DEVICE_NIC"),
            backend=backend,
            mode=get.choice("MORIIO_GPU_MODE", ("READ", "WRITE"), "READ", upper=True),
            dp=dp,
            tp=tp,
            port_base=get.integer("MORIIO_GPU_PORT_BASE", 18000, 1024, 64800),
            block_size=get.integer("MORIIO_GPU_BLOCK_SIZE", 16, 1, 4096),
            vllm=get.text("MORIIO_GPU_VLLM") or "vllm",
            vllm_args=tuple(shlex.split(get.text("MORIIO_GPU_VLLM_ARGS") or "")),
            python=get.text("MORIIO_GPU_PYTHON"),
            startup_timeout=get.number("MORIIO_GPU_STARTUP_TIMEOUT", 1800.0),
            request_timeout=get.number("MORIIO_GPU_REQUEST_TIMEOUT", 120.0),
            max_tokens=get.integer("MORIIO_GPU_MAX_TOKENS", 32, 1, 4096),
            greedy_min_match=get.fraction("MORIIO_GPU_GREEDY_MIN_MATCH", 1.0),
            log_dir=get.text("MORIIO_GPU_LOG_DIR"),
        )


class _Reader:
    """Typed reads of one environment mapping; each error names its variable."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env

    def text(self, name: str) -> str | None:
        value = self.env.get(name, "").strip()
        return value or None

    def ip(self, name: str) -> str | None:
        value = self.text(name)
        if value is not None:
            try:
                ipaddress.ip_address(value)
            except ValueError:
                raise SettingsError(f"{name} must be an IP address, got {value!r}") from None
        return value

    def integer(self, name: str, default: int, low: int, high: int) -> int:
        value = self.text(name)
        if value is None:
            return default
        try:
            number = int(value)
        except ValueError:
            raise SettingsError(f"{name} must be an integer, got {value!r}") from None
        if not low <= number <= high:
            raise SettingsError(f"{name} must be between {low} and {high}, got {number}")
        return number

    def number(self, name: str, default: float) -> float:
        value = self.text(name)
        if value is None:
            return default
        try:
            number = float(value)
        except ValueError:
            raise SettingsError(f"{name} must be a number of seconds, got {value!r}") from None
        if number <= 0:
            raise SettingsError(f"{name} must be > 0, got {value!r}")
        return number

    def fraction(self, name: str, default: float) -> float:
        value = self.number(name, default)
        if value > 1:
            raise SettingsError(f"{name} must be in (0, 1], got {value}")
        return value

    def choice(
        self, name: str, allowed: tuple[str, ...], default: str, *, upper: bool = False
    ) -> str:
        value = self.text(name) or default
        value = value.upper() if upper else value.lower()
        if value not in allowed:
            raise SettingsError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        return value

    def gpus(self, name: str, default: tuple[int, ...]) -> tuple[int, ...]:
        value = self.text(name)
        if value is None:
            return default
        try:
            gpus = tuple(int(g) for g in value.split(","))
        except ValueError:
            raise SettingsError(
                f"{name} must list GPU indexes like 0,1,2,3, got {value!r}"
            ) from None
        if len(set(gpus)) != len(gpus) or min(gpus) < 0:
            raise SettingsError(f"{name} lists a GPU twice or a negative index: {value!r}")
        return gpus


def detect_host_ip() -> str:
    """This node's address on its default route (no packet is sent), else its name's."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: only selects the outgoing interface
            return str(probe.getsockname()[0])
        except OSError:
            pass
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


# ----------------------------------------------------------------------- requirements


def _import_mori(python: str) -> str | None:
    """None when ``python -c 'import mori.io'`` works, else the error's last line."""
    try:
        result = subprocess.run(
            [python, "-c", "import mori.io"],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{type(exc).__name__}: {exc}"
    if result.returncode == 0:
        return None
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    return lines[-1] if lines else f"exit status {result.returncode}"


@dataclass(frozen=True)
class Probes:
    """Where requirements are looked for; tests point these at a fake host."""

    root: Path = Path("/")
    which: Callable[[str], str | None] = shutil.which
    import_mori: Callable[[str], str | None] = _import_mori
    environ: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))

    def path(self, absolute: str) -> Path:
        return self.root / absolute.lstrip("/")


def mori_python(env: Mapping[str, str], probes: Probes) -> str:
    """The Python vLLM runs under: MORIIO_GPU_PYTHON, python3 beside vllm, else ours."""
    explicit = env.get("MORIIO_GPU_PYTHON", "").strip()
    if explicit:
        return explicit
    vllm = probes.which(env.get("MORIIO_GPU_VLLM", "").strip() or "vllm")
    if vllm:
        beside = Path(vllm).parent / "python3"
        if beside.exists():
            return str(beside)
    return sys.executable


def missing_requirements(env: Mapping[str, str], probes: Probes | None = None) -> list[str]:
    """Each missing piece, in words that say what to fix; empty when the suite can run."""
    probes = probes or Probes()
    missing: list[str] = []
    if not probes.path("/dev/kfd").exists():
        missing.append(
            "no /dev/kfd (AMD GPU kernel driver not loaded, or the container lacks "
            "--device /dev/kfd)"
        )
    rocm_path = probes.environ.get("ROCM_PATH", "")
    if not (
        (rocm_path and probes.path(rocm_path).is_dir())
        or probes.path("/opt/rocm").is_dir()
        or probes.which("rocminfo")
        or probes.which("amd-smi")
    ):
        missing.append("no ROCm (no /opt/rocm, $ROCM_PATH, rocminfo or amd-smi)")
    backend = env.get("MORIIO_GPU_BACKEND", "").strip().lower() or "rdma"
    ib = probes.path("/sys/class/infiniband")
    devices = sorted(p.name for p in ib.iterdir()) if ib.is_dir() else []
    nic = env.get("MORI_DEVICE_NIC", "").strip()
    if backend == "rdma" and not devices:
        missing.append("no RDMA device under /sys/class/infiniband (NIC driver, rdma-core)")
    elif backend == "rdma" and nic and nic not in devices:
        missing.append(
            f"MORI_DEVICE_NIC={nic} is not under /sys/class/infiniband (there: "
            f"{', '.join(devices)})"
        )
    vllm = env.get("MORIIO_GPU_VLLM", "").strip() or "vllm"
    if not probes.which(vllm):
        missing.append(f"no `{vllm}` executable (set MORIIO_GPU_VLLM)")
    python = mori_python(env, probes)
    error = probes.import_mori(python)
    if error is not None:
        missing.append(f"`import mori.io` fails under {python} ({error})")
    if not env.get("MORIIO_GPU_MODEL", "").strip():
        missing.append("MORIIO_GPU_MODEL unset (the model every instance serves)")
    return missing


def skip_reason(env: Mapping[str, str], probes: Probes | None = None) -> str | None:
    """The one line every GPU test skips with, or None when nothing is missing."""
    missing = missing_requirements(env, probes)
    if not missing:
        return None
    return f"{SKIP_PREFIX}: {'; '.join(missing)} (see {README})"
