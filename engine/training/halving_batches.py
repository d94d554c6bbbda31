"""Work without gradients done a batch at a time, the batch halved after a CUDA out-of-memory error.

For passes whose batch is a speed choice, not part of the maths (GRPO's sampling, the reference's
log-probabilities): a batch that does not fit is tried again at half its size, and later batches keep the
smaller size; only one item at a time failing is an error, with the caller's advice. The training loop's
own back-off (engine.training.loop) is different: it may switch recomputation on first, and checkpoints
the size it ended with.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def in_halving_batches(
    total: int,
    batch: int,
    run: Callable[[int, int], None],
    *,
    one_fails: str,
    on_back_off: Callable[[int], None] = lambda batch: None,
) -> int:
    """``run(start, stop)`` over ``range(total)`` in slices of ``batch`` (at least 1); after a CUDA
    out-of-memory error the same slice is tried again at half the batch (``on_back_off`` hears the new size).
    A single item that does not fit raises RuntimeError(``one_fails``): the caller's message, saying what to
    change. Returns the batch it ended with."""
    batch = max(1, batch)
    start = 0
    while start < total:
        stop = min(total, start + batch)
        try:
            run(start, stop)
        except torch.cuda.OutOfMemoryError:
            if batch == 1:
                raise RuntimeError(one_fails) from None
            batch //= 2
            torch.cuda.empty_cache()
            on_back_off(batch)
            continue
        start = stop
    return batch
