"""The simulated EngineCore: DP ranks with their KV memory, the toy model's runner, and the
MoRI-IO transfer paths (prefill legs hold blocks; READ decodes pull them; WRITE prefills push
them). The OpenAI server hands it ``EngineRequest``s and reads ``TokenEvent``s back."""
