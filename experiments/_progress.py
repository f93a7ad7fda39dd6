"""Progress bars for the experiments that do not flood logs.

`progress(...)` is `tqdm(...)` in a terminal. When stderr is not a terminal (output
redirected to a log file, a batch job, CI), the bar is redrawn at most once every
`JPC_PROGRESS_SECONDS` seconds (default 60) and each redraw is a line of its own,
instead of a stream of carriage-return updates several times a second.
`JPC_PROGRESS_SECONDS=0` turns the bars off there.
"""

import os
import sys
from typing import Any

from tqdm import tqdm


DEFAULT_SECONDS = 60.0


class _Lines:
    """A stream wrapper that turns tqdm's `\\r` redraws into whole lines."""

    def __init__(self, stream: Any):
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").rstrip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def _is_terminal(stream: Any) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def progress(iterable: Any = None, **kwargs: Any) -> tqdm:
    """`tqdm(iterable, **kwargs)`, sparse when stderr is not a terminal."""
    stream = kwargs.pop("file", sys.stderr)
    if _is_terminal(stream):
        return tqdm(iterable, file=stream, **kwargs)
    seconds = float(os.environ.get("JPC_PROGRESS_SECONDS", DEFAULT_SECONDS))
    kwargs.pop("dynamic_ncols", None)
    return tqdm(
        iterable,
        file=_Lines(stream),
        disable=seconds <= 0 or kwargs.pop("disable", False),
        mininterval=seconds,
        maxinterval=max(seconds, 10.0),
        ncols=100,
        **kwargs,
    )
