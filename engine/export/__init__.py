"""GGUF export: merge a LoRA into its base, convert to GGUF, quantize, verify, register with Ollama.

Modules (one job each):
  source.py        what to export: a finished job, an adapter folder or a model folder
  merge.py         the LoRA deltas, merged tensor by tensor (fp32, never into 4-bit weights)
  vocab.py         tokenizer metadata (tokens, types, merges, pre-tokenizer, special ids, template)
  convert.py       Hugging Face safetensors -> GGUF on gguf.GGUFWriter, streaming, merge on the fly
  adapter_gguf.py  a LoRA adapter as a GGUF LoRA file (Ollama ADAPTER)
  quantize.py      llama.cpp's quantizer through llama-cpp-python
  verify.py        llama.cpp vs transformers logits (argmax agreement, max |diff|), greedy decoding
  templates.py     the chat template as an Ollama Go TEMPLATE, proven by rendering
  gotemplate.py    a renderer for the Go-template subset we emit
  ollama.py        Modelfile and registration (HTTP API via the ollama client, or the CLI)
  run.py           the export job: run_export(spec, job_dir, events) -> JobResult
Nothing here is imported by the server; the worker imports ``engine.export.run`` lazily.
"""
