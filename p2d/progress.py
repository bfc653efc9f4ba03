"""Progress reporting shared by the library, the CLI and the app.

Library functions take ``progress(done: int, total: int, desc: str)``; None means silent.
``ConsoleProgress`` draws one tqdm bar per description on stderr (the CLI uses it); the app wraps
the same callback around Gradio's progress bar.
"""

from __future__ import annotations

import sys
import weakref
from typing import Callable, Optional

from tqdm.auto import tqdm

ProgressFn = Optional[Callable[[int, int, str], None]]
StopFn = Optional[Callable[[], bool]]


def report(progress: ProgressFn, done: int, total: int, desc: str) -> None:
    if progress is not None:
        progress(done, total, desc)


class Ticker:
    """Counts units of work and reports each to a progress callback (total grows if exceeded)."""

    def __init__(self, progress: ProgressFn, total: int):
        self.progress, self.total, self.done = progress, total, 0

    def __call__(self, desc: str) -> None:
        self.done += 1
        report(self.progress, self.done, max(self.total, self.done), desc)

    step = __call__


class ConsoleProgress:
    """A progress callback that renders one tqdm bar on stderr.

    A new bar starts when the total changes or the count goes back (a new phase); otherwise the
    bar advances and shows the latest description.
    """

    _open: "weakref.WeakSet[ConsoleProgress]" = weakref.WeakSet()

    def __init__(self, disable: bool = False):
        self._bar = None
        self.disable = disable
        ConsoleProgress._open.add(self)

    @classmethod
    def close_all(cls) -> None:
        """End every bar still drawn (so that an error message starts on a line of its own)."""
        for progress in list(cls._open):
            progress.close()

    def __call__(self, done: int, total: int, desc: str) -> None:
        if self.disable:
            return
        bar = self._bar
        if bar is None or bar.total != total or done < bar.n:
            self.close()
            bar = self._bar = tqdm(total=total, desc=desc, file=sys.stderr, leave=True, dynamic_ncols=True)
        elif desc != bar.desc:
            bar.set_description(desc, refresh=False)
        bar.update(done - bar.n)
        if done >= total:
            self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
