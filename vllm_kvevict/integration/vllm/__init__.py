"""The vLLM shell: everything that imports vllm lives here and translates; policies decide."""
