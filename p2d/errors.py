"""User-facing errors.

`UserError` is for problems the user can fix (bad file, wrong column, unknown model, out of memory).
The CLI prints its message on one line and exits with code 2; the app shows it in the page.
Anything else is a bug and may crash with a traceback.
"""


class UserError(Exception):
    """An error caused by user input; its message says what to do."""


OOM_ADVICE = ("out of memory: lower the batch size (batch_size) or the max length (max_length), raise "
              "gradient accumulation (grad_accum) to keep the effective batch, use bf16 on a GPU (dtype), or pick "
              "a smaller model")


def is_out_of_memory(exc: BaseException) -> bool:
    """True for CUDA/MPS/CPU allocation failures (they arrive as different exception types)."""
    if isinstance(exc, MemoryError):
        return True
    if type(exc).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError, without importing torch
        return True
    msg = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg)
