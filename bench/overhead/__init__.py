"""The overhead benchmark's parts: load generator, processes, cells, report, profile.

``bench/bench_overhead.py`` is the command; these modules are its pieces, split so that the
load generator (the part whose own cost decides whether the numbers can be trusted) can be
read on its own.
"""
