"""Fixtures of the vLLM plugin tests (engines.py holds them with the helpers the test modules import)."""
from engines import compile_cache, smollm2, steerer_files  # noqa: F401  (pytest finds fixtures here)
