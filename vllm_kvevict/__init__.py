"""vllm-kvevict: per-request KV-cache eviction and selection for vLLM's paged KV cache."""

__version__ = "0.1.0"
