"""The prefix-cache benchmark (``bench/bench_cache.py``): routers over simulated prefills that
keep a prefix cache, on a workload of shared system prompts and multi-turn conversations."""
