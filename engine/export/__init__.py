"""GGUF export: merge a LoRA into its base, convert, quantize, verify, register with Ollama."""
