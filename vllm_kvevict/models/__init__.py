"""Model preparation (the default model) and model-specific assets (Locret weights)."""
