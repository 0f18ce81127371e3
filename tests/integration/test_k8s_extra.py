"""Without the optional k8s extra (kubernetes-asyncio), checked in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys


def test_the_pod_rules_and_config_import_without_the_k8s_extra() -> None:
    """Only discovery.kubernetes.api may need kubernetes-asyncio (the optional extra)."""
    code = (
        "import sys; sys.modules['kubernetes_asyncio'] = None\n"
        "import moriio_proxy.config, moriio_proxy.discovery.kubernetes.pods\n"
        "try:\n"
        "    import moriio_proxy.discovery.kubernetes.source\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert "pip install 'moriio-proxy[k8s]'" in result.stdout
