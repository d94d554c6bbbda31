"""Building blocks of a training recipe (torchtune's shape: recipes in engine.recipes call these).

loading      device choice, dataset loading with its events, tokenizing, settings resolved
             before the model loads
base_model   loading the base model and tokenizer (NF4 / 16-bit / fp32; Unsloth or transformers)
lora         the model a recipe trains (base model, speed-ups, fresh LoRA), saving the adapter
batching     packed rows, step plans fixed up front, collation with shifted targets
loss         next-token loss from hidden states in chunks (a frozen head's gradient in the forward)
loop         the optimizer loop (OOM back-off, heat pauses, cancel, checkpoints)
checkpoints  atomic, resumable training checkpoints
evaluation   held-out loss and greedy exact match
accel        optional accelerators (Liger, Unsloth) and the autocast dtype
backend      train.backend (auto | native | unsloth) and switching on the native fast path
step         what one optimizer step gets and returns: where an objective plugs into the loop
fast_step    one optimizer step with no host sync inside
cuda_graphs  the step's micro-batches replayed from CUDA graphs, one per padded shape
offload      checkpointed layer inputs kept in pinned host memory during the step
fused_lora   base matmul and LoRA adapter in one autograd node
varlen_attention  packed rows through flash-attention's varlen kernel (no dense mask)
ranks        one rank of a job on several devices: its place, DDP or FSDP wrapping, its step
slao         SLAO merge maths between a series' runs
cl_metrics   continual-learning metrics of the evaluation matrix
"""
