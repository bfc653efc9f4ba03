"""User-facing errors.

`UserError` is for problems the user can fix (bad file, wrong column, unknown model, out of memory).
The CLI prints its message on one line and exits with code 2; the app shows it in the page.
Anything else is a bug and may crash with a traceback.

`shown(value)` is how a message quotes a value it got: a short repr, built without formatting the whole
value (a huge or deeply shared structure never turns into a huge message); `one_line(exc)` how it quotes
an exception raised by a library.
"""

import reprlib

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxlong, _REPR.maxother = 2, 48, 24, 48
_REPR.maxtuple = _REPR.maxlist = _REPR.maxarray = _REPR.maxdict = _REPR.maxset = _REPR.maxfrozenset = 4
_REPR.maxdeque = 4


def shown(value, limit: int = 80) -> str:
    """A repr of ``value`` for a one-line message: at most ``limit`` characters, no line breaks."""
    try:
        text = _REPR.repr(value)
    except Exception:  # noqa: BLE001 - a value whose repr fails is still named
        text = f"<{type(value).__name__}>"
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def one_line(exc: BaseException, limit: int = 200) -> str:
    """An exception's message on one line of at most ``limit`` characters (its type name when empty), for
    quoting a library's error inside a UserError."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
