"""Checkpointed layer inputs kept in pinned host memory while a step runs (``train.offload_activations``).

With gradient checkpointing each decoder layer keeps only its input for the backward pass; for a 7B
model at 4 x 2,048 tokens that is 28 x 58 MB = 1.6 GB on the card for the whole step. Here each input
is copied to pinned host memory on a side stream as the forward pass saves it (the card's copy is
freed once the copy is done) and copied back just before its layer is recomputed, the next one down
fetched while the current one computes. The card then holds about two layer inputs instead of all.

Only the tensors that ``torch.utils.checkpoint`` saves for its recomputation pass through these hooks
(the hooks wrap the checkpoint call, not the layer's own forward, whose saved tensors the checkpoint
drops anyway), and of those only the ones that carry a gradient: the hidden states. What else a layer
is given (the rotary tables every layer shares, masks) stays on the card, as do tensors under
``min_bytes``, whose copies would cost more in calls than they free.
Pinned buffers come from torch's caching host allocator, which keeps them for the next step and does
not hand a buffer out again while a copy from or to it is still queued.
"""

from __future__ import annotations

import functools
from typing import Any

import torch


class _Offloaded:
    """One saved tensor living in host memory, and its way back to the card."""

    __slots__ = ("host", "device", "gpu", "fetched", "previous", "used")

    def __init__(self, host: torch.Tensor, device: torch.device, previous: Any):
        self.host: torch.Tensor | None = host  # filled by a copy on the side stream (fetches queue after it)
        self.device = device
        self.gpu: torch.Tensor | None = None  # the copy back, once fetched
        self.fetched: torch.cuda.Event | None = None
        self.previous = previous  # saved just before this one: the next one the backward pass needs
        self.used = False


class ActivationOffload:
    """Saved-tensor hooks around a checkpoint function (see the module's docstring)."""

    def __init__(self, min_bytes: int = 1 << 20):
        self.min_bytes = min_bytes
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._last: _Offloaded | None = None
        self.offloaded_bytes = 0  # the last forward pass's total (one micro-batch)

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def wrap(self, checkpoint: Any) -> Any:
        """``checkpoint`` (the function a layer calls to checkpoint itself) with its inputs offloaded."""

        @functools.wraps(checkpoint)
        def offloaded_checkpoint(function: Any, *args: Any, **kwargs: Any) -> Any:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
                return checkpoint(function, *args, **kwargs)

        return offloaded_checkpoint

    def _pack(self, tensor: torch.Tensor) -> Any:
        if (
            not (tensor.is_cuda and tensor.requires_grad)
            or tensor.numel() * tensor.element_size() < self.min_bytes
        ):
            return tensor
        if self._last is not None and self._last.used:  # a new forward pass: start a new chain
            self._last, self.offloaded_bytes = None, 0
        stream = self._stream(tensor.device)
        stream.wait_stream(torch.cuda.current_stream(tensor.device))  # the tensor is computed
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        with torch.cuda.stream(stream):
            host.copy_(tensor, non_blocking=True)
        tensor.record_stream(stream)  # the card's memory is reused only after the copy
        self.offloaded_bytes += host.numel() * host.element_size()
        self._last = _Offloaded(host, tensor.device, self._last)
        return self._last

    def _fetch(self, saved: _Offloaded) -> None:
        """Start the copy back to the card on the side stream (after the copy out, same stream)."""
        assert saved.host is not None
        with torch.cuda.stream(self._stream(saved.device)):
            saved.gpu = saved.host.to(saved.device, non_blocking=True)
            saved.fetched = torch.cuda.Event()
            saved.fetched.record()
        saved.host = None  # the caching host allocator keeps the buffer until the copy has run

    def _unpack(self, saved: Any) -> torch.Tensor:
        if isinstance(saved, torch.Tensor):
            return saved
        if saved.gpu is None:
            self._fetch(saved)
        current = torch.cuda.current_stream(saved.device)
        current.wait_event(saved.fetched)
        tensor = saved.gpu
        tensor.record_stream(current)  # allocated on the side stream, used (and freed) on this one
        saved.gpu, saved.used = None, True
        # Prefetch the input the backward pass needs next (saved just before this one).
        if (before := saved.previous) is not None and before.gpu is None and before.host is not None:
            self._fetch(before)
        saved.previous = None
        return tensor


def offload_checkpointed_inputs(model: Any, min_bytes: int = 1 << 20) -> int:
    """Route every checkpointing module's saved inputs through one ``ActivationOffload``; returns how
    many modules (the decoder layers, and models that carry the flag themselves). Call after gradient
    checkpointing is switched on (engine.training.lora)."""
    offload = ActivationOffload(min_bytes)
    n = 0
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False) and hasattr(
            module, "_gradient_checkpointing_func"
        ):
            module._gradient_checkpointing_func = offload.wrap(module._gradient_checkpointing_func)
            n += 1
    model._engine_offload = offload
    return n
