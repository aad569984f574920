"""Training for policies that learn (transformers on the default model, no vLLM): `locret`'s retaining heads."""
