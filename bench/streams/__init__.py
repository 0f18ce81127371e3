"""The streams benchmark's parts: many long-lived streams through the proxy, and what they
cost it in memory, descriptors and CPU.

``bench/bench_streams.py`` is the command. ``client`` is the load generator (one process,
one cheap protocol object per stream), ``probe`` reads processes from ``/proc``,
``deployment`` starts the proxy and simulators, ``phases`` runs the idle and the slow
phases, ``report`` writes the tables.
"""
