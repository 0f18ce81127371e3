"""moriio-proxy: the prefill/decode proxy for vLLM's MoRI-IO KV connector."""

__version__ = "0.1.0"
