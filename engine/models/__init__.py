"""Base models and adapters, as files and names (weights load in engine.training.base_model).

presets   presets, resolving names, a model's shape from its config and safetensors headers
tiny      the offline ``tiny`` preset (tokenizer + random-weight model, built on first use)
adapters  the PEFT adapter folder: recognise, read, LoRA factors <-> state dicts <-> a peft model
"""
