"""A trainer's torch state (seed, thread count) set for its own run and given back to the caller afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def own_torch_state(seed: int, threads: int) -> Iterator[None]:
    """Seed torch's global RNG and set its thread count inside the block; restore both on leaving it."""
    previous_threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_num_threads(max(1, threads))
        try:
            yield
        finally:
            torch.set_num_threads(previous_threads)
