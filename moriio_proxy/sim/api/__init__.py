"""The simulated instance's HTTP side: vLLM 0.32's OpenAI server (validation, JSON and SSE
answers, error shapes), its listening socket, and the ``/sim/*`` control routes."""
