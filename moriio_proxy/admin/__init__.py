"""Steering the fleet at run time: the operator's actions on registered instances
(``actions``), their HTTP routes (``routes``), vLLM's profiler fan-out (``profile``) and
the ``moriio-proxy admin`` command (``command``).

Nothing is re-exported here: discovery imports ``actions`` alone, and importing the
routes from there would pull the whole app into it.
"""
