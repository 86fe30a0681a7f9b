"""Buffers reused across calls, for the large temporaries of collection.

A CPU tensor over 32 MiB is mapped fresh from the kernel on every allocation (glibc's mmap
threshold) and first touched page by page: a bfloat16 product of 16k rows by 2k features
spent more time faulting in its output than multiplying. Each thread keeps one buffer per
name and hands out views of it, grown when a call needs more.
"""

from __future__ import annotations

import math
import threading

import torch

_LOCAL = threading.local()


def scratch(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor of `shape`, sharing memory with the last one this thread
    got under `name` (whose contents it overwrites: use one before asking again)."""
    buffers: dict[str, torch.Tensor] = _LOCAL.__dict__.setdefault("buffers", {})
    numel = math.prod(shape)
    held = buffers.get(name)
    if held is None or held.dtype != dtype or held.numel() < numel:
        held = torch.empty(numel, dtype=dtype)
        buffers[name] = held
    return held[:numel].view(shape)


def release_scratch() -> None:
    """Drop this thread's buffers: their memory goes back to the system (a stage that used
    them calls it when done: `collect_codes` at its end)."""
    _LOCAL.__dict__.pop("buffers", None)
