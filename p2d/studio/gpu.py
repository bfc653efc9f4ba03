"""``@gpu(duration=...)``: Hugging Face ZeroGPU's ``spaces.GPU`` when the ``spaces`` package is
importable, a no-op decorator everywhere else.

Note: ZeroGPU attaches a GPU to a decorated call made from a Gradio request. The studio runs its
jobs in a background worker thread (so training survives page reloads); on ZeroGPU hardware that
may not get a GPU. Dedicated GPU hardware (``suggested_hardware`` in README_SPACE.md) or CPU Spaces
work as everywhere else.
"""

from __future__ import annotations

from typing import Callable


def gpu(duration: int = 60) -> Callable:
    try:
        import spaces  # type: ignore
    except ImportError:
        spaces = None
    if spaces is None or not hasattr(spaces, "GPU"):
        return lambda fn: fn
    return spaces.GPU(duration=duration)
