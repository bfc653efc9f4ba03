"""The app's server log (stderr): every line bounded, whatever a visitor sends.

- `ServerLog.user_error(client, where, message)`: a visitor's mistake as one line, its text cut to
  ``line_chars`` characters (a 65,000-character model name costs one short line, not 66 KB);
- `ServerLog.bug(client, where, exc)`: a bug's traceback (the server must keep those), each line cut
  to ``line_chars`` and at most ``traceback_lines`` lines of it (the innermost);
- `ServerLog.note(text)`: anything else the server says, one cut line.

The same message from the same client address is written once and then counted: the count is written
when it comes again after ``repeat_every_s`` ("... 412 more times in 60 s"). Each address has a budget
of ``lines_per_minute`` lines; beyond it its messages are counted, and the count is written once the
minute is over. So one address adds at most about ``lines_per_minute`` lines a minute to the log
however fast it sends requests. Lines carry no key, token or server path beyond what the message
itself holds (the gate scrubs paths from what the visitor sees; the log is the host's).

The app writes no log file of its own: the platform (a Space, a terminal, systemd) keeps stderr.
"""

from __future__ import annotations

import sys
import threading
import time
import traceback
from collections import OrderedDict


def cut(text, limit: int) -> str:
    """``text`` on one line, at most ``limit`` characters (``...`` and the count of the rest when cut)."""
    text = " ".join(str(text).split())
    if len(text) <= limit:
        return text
    tail = f"... (+{len(text) - limit} characters)"
    return text[:max(0, limit - len(tail))] + tail


class _Client:
    __slots__ = ("window", "lines", "held", "seen")

    def __init__(self, now: float):
        self.window, self.lines, self.held = now, 0, 0
        self.seen: OrderedDict[str, list] = OrderedDict()  # message -> [when last written, times since]


class ServerLog:
    """See the module docstring. ``stream``: where lines go (default: ``sys.stderr`` when written)."""

    def __init__(self, stream=None, line_chars: int = 300, traceback_lines: int = 24, lines_per_minute: int = 30,
                 repeat_every_s: float = 60.0, clock=time.monotonic, max_clients: int = 2048):
        self.stream, self.line_chars, self.traceback_lines = stream, line_chars, traceback_lines
        self.lines_per_minute, self.repeat_every_s, self.clock = lines_per_minute, repeat_every_s, clock
        self.max_clients = max_clients
        self._clients: OrderedDict[str, _Client] = OrderedDict()
        self._lock = threading.Lock()
        self.written = 0  # lines written so far (for tests and the bench)

    # -- what the app logs ------------------------------------------------------------------------
    def note(self, text, client: str = "") -> None:
        self._emit(client, cut(text, self.line_chars), [f"p2d studio: {cut(text, self.line_chars)}"])

    def user_error(self, client: str, where: str, message) -> None:
        text = cut(message, self.line_chars)
        self._emit(client, f"{where}|{text}", [f"p2d studio: {client or '-'} {cut(where, 60)}: {text}"])

    def bug(self, client: str, where: str, exc: BaseException) -> None:
        head = cut(f"{type(exc).__name__}: {exc}", self.line_chars)
        lines = traceback.format_exception(type(exc), exc, exc.__traceback__)
        lines = [cut(part, self.line_chars) for line in lines for part in line.rstrip("\n").split("\n") if part.strip()]
        if len(lines) > self.traceback_lines:
            lines = [lines[0], f"... ({len(lines) - self.traceback_lines} lines left out)",
                     *lines[-(self.traceback_lines - 1):]]
        self._emit(client, f"{where}|bug|{head}",
                   [f"p2d studio: {client or '-'} {cut(where, 60)}: internal error {head}", *lines])

    # -- the bounds -------------------------------------------------------------------------------
    def _emit(self, client: str, key: str, lines: list[str]) -> None:
        now = self.clock()
        out: list[str] = []
        with self._lock:
            c = self._clients.get(client)
            if c is None:
                c = self._clients[client] = _Client(now)
                while len(self._clients) > self.max_clients:
                    self._clients.popitem(last=False)
            self._clients.move_to_end(client)
            who = client or "-"
            if now - c.window >= 60.0:
                if c.held:
                    out.append(f"p2d studio: {who}: {c.held} more messages in the last minute were not written")
                c.window, c.lines, c.held = now, 0, 0
            seen = c.seen.get(key)
            if seen is not None:
                seen[1] += 1
                if now - seen[0] < self.repeat_every_s:
                    self._write(out)
                    return
                lines = [f"{lines[0]} ({seen[1]} more times in {now - seen[0]:.0f} s)"]
                seen[0], seen[1] = now, 0
            else:
                c.seen[key] = [now, 0]
                while len(c.seen) > 16:
                    c.seen.popitem(last=False)
            if c.lines >= self.lines_per_minute:
                c.held += 1
            else:
                c.lines += len(lines)
                out.extend(lines)
            self._write(out)

    def _write(self, lines: list[str]) -> None:
        if not lines:
            return
        stream = self.stream or sys.stderr
        try:
            stream.write("".join(line + "\n" for line in lines))
            stream.flush()
        except (OSError, ValueError):  # a closed stream: nothing to do about it here
            return
        self.written += len(lines)


#: the app's log (one per process, like a logger)
LOG = ServerLog()
