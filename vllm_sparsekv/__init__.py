"""vllm-sparsekv: sparse KV-cache decode attention for vLLM."""
__version__ = "0.1.0"
