"""Hardware the app refuses: Hugging Face ZeroGPU.

ZeroGPU (``SPACES_ZERO_GPU=true`` on the Space) lends a GPU only for a call of a function decorated
with ``@spaces.GPU``, and only when that call is made inside the Gradio request that triggered it:
the ``spaces`` package reads the request from a context variable, asks the scheduler for a GPU for
that request, pickles the call's arguments to a forked worker process, runs the function there and
pickles the result back (``spaces/zero/wrappers.py``). P2D Studio runs its jobs in one background
worker thread (a training outlives the request that started it, survives page reloads, reports
progress live and stops between steps), and its jobs work on objects that cannot cross a process
boundary: the session's `p2d.pipeline.Run` with its progress and stop callbacks (closures, a
threading.Event) and the model shared by all sessions. From that thread a decorated call has no
request (so no GPU is granted to it) and its arguments do not pickle; even where they did, the
worker's changes to the Run (results, manifest) and its progress would stay in the forked process.

So the app refuses ZeroGPU hardware at start-up with one line saying what to pick instead, rather
than start and run every job on the CPU (or fail mid-job). CPU and dedicated GPU hardware (T4, L4,
A10G, ...) run the jobs as everywhere else. Not tested on a real ZeroGPU Space (no access here): the
detection is the environment variable the ``spaces`` package itself reads (``spaces/config.py``).
"""

from __future__ import annotations

import os

from p2d.errors import UserError

ZERO_GPU_MESSAGE = ("ZeroGPU hardware is not supported by P2D Studio: ZeroGPU lends a GPU only inside the request "
                    "that asked for it, and the studio runs its jobs in a background worker (trainings outlive "
                    "requests and page reloads). Pick CPU or a dedicated GPU (e.g. T4 small) in the Space's "
                    "settings.")


def zero_gpu() -> bool:
    """True on ZeroGPU hardware (the ``spaces`` package's own test: env SPACES_ZERO_GPU is true)."""
    return os.environ.get("SPACES_ZERO_GPU", "").strip().lower() in ("1", "true", "yes", "on")


def check_hardware() -> None:
    """Refuse to start on ZeroGPU (UserError with what to pick instead)."""
    if zero_gpu():
        raise UserError(ZERO_GPU_MESSAGE)
