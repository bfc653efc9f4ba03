"""Progress reporting shared by the library, the CLI and the app.

Library functions take ``progress(done: int, total: int, desc: str)``; None means silent.
``ConsoleProgress`` draws one tqdm bar per description on stderr (the CLI uses it); the app wraps
the same callback around Gradio's progress bar.
"""

from __future__ import annotations

import sys
from typing import Callable, Optional

ProgressFn = Optional[Callable[[int, int, str], None]]
StopFn = Optional[Callable[[], bool]]


def report(progress: ProgressFn, done: int, total: int, desc: str) -> None:
    if progress is not None:
        progress(done, total, desc)


class ConsoleProgress:
    """A progress callback that renders tqdm bars on stderr, one per `desc`."""

    def __init__(self, disable: bool = False):
        self._bars: dict[str, object] = {}
        self.disable = disable or not sys.stderr

    def __call__(self, done: int, total: int, desc: str) -> None:
        from tqdm.auto import tqdm

        if self.disable:
            return
        bar = self._bars.get(desc)
        if bar is None or bar.total != total:
            if bar is not None:
                bar.close()
            bar = self._bars[desc] = tqdm(total=total, desc=desc, file=sys.stderr, leave=True, dynamic_ncols=True)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()
            self._bars.pop(desc, None)

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()
