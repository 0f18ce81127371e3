"""Benchmarks and soak runs of moriio-proxy (scripts; nothing here is imported by the proxy)."""
