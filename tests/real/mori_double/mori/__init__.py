"""The test double of AMD's ``mori`` package: only ``mori.io``, for CPU memory (io.py)."""
