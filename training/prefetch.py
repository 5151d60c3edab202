"""Make the next step's batch in a background thread while the current step runs on the GPU.

A GPU step leaves the training process's Python thread waiting on the device (the GIL released), so the host
work of the next batch (stacking its images, tokenising and packing its prompts and completions: ~60-100 ms for
128 smol scenes on one core, `python -m bench.host_batch`) can run meanwhile instead of between steps. On a
CPU the cores are already busy with the step, so the stages switch it on only on a GPU.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class Prefetcher(Generic[T]):
    """`prefetcher(step)` returns `make(step)`; when enabled, `make(step + 1)` is then started in one background
    thread, so a loop asking for consecutive steps gets each batch already made. A step other than the one
    prefetched (a resumed run's first) is made in the caller's thread. `make` must be safe to run beside the
    training step: it should only read the examples and the tokenizer."""

    def __init__(self, make: Callable[[int], T], enabled: bool = True):
        self.make = make
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch") if enabled else None
        self.pending: tuple[int, Future] | None = None

    def __call__(self, step: int) -> T:
        if self.pool is None:
            return self.make(step)
        if self.pending is not None and self.pending[0] == step:
            result = self.pending[1].result()
        else:
            stale = self.pending
            if stale is not None and not stale[1].cancel():
                stale[1].exception()  # wait for it: never two `make`s at once (fast tokenizers refuse concurrent use)
            result = self.make(step)
        self.pending = (step + 1, self.pool.submit(self.make, step + 1))
        return result

    def close(self) -> None:
        """Wait for a batch being made, drop it, stop the thread."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool, self.pending = None, None

    def __enter__(self) -> "Prefetcher[T]":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
