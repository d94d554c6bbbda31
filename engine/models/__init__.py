"""Base models and adapters, as files and names (weights load in engine.training.base_model)."""
