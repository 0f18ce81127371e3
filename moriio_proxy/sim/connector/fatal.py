"""How a connector rule says "the real connector raises here, inside EngineCore".

vLLM runs ``add_new_req`` and its friends in the scheduler; an exception there takes the
whole engine down, not just the request. The simulated engine catches this one exception
type and dies the same way.
"""

from __future__ import annotations


class EngineCoreFatal(Exception):
    """Raised where the real connector raises inside EngineCore: the whole engine dies."""
