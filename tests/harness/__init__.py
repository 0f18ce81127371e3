"""What the tests share, one module per concern.

- ``waiting``: ``eventually`` (wait for a state), ``still_pending`` (assert a non-event)
- ``sse``: parsing server-sent events
- ``proxy``: ``running_proxy``, a proxy in this process with simulated instances
- ``serve``: ``serve_process``, ``moriio-proxy serve`` as a real process
- ``legs``: playing the proxy's part by hand against simulated instances
- ``ports``: refused and unconnectable ports, and ``free_port`` where a port must be known
  before its server starts
- ``clock``: clocks for ``Registry(clock=...)``
- ``kube``: a fake Kubernetes API server
- ``entries``: registry entries for policy tests
- ``contract``: wire shapes pinned apart from the code
- ``imports``: what each module of moriio_proxy imports, read from its source

Fixtures built on them are in tests/conftest.py. The names below are re-exported for the
test tiers that import them from the package.
"""

from .ports import free_port
from .proxy import RunningProxy, running_proxy
from .sse import read_sse
from .waiting import eventually

__all__ = ["RunningProxy", "eventually", "free_port", "read_sse", "running_proxy"]
