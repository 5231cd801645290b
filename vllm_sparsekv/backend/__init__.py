"""vLLM glue (version-sensitive code lives in compat.py)."""
