"""``@gpu(duration=...)``: Hugging Face ZeroGPU's ``spaces.GPU`` when the ``spaces`` package is
importable, a no-op decorator everywhere else.

ZeroGPU lends a GPU only for the duration of a call to a decorated function, and only when that call
comes from a Gradio request. The studio runs its jobs in a background worker thread (so a training
survives a page reload), so on ZeroGPU hardware a job may get no GPU and run on the CPU. A Space with
dedicated GPU hardware, or a CPU Space, runs the jobs as everywhere else.
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
