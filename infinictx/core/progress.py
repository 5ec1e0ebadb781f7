"""Progress bars: one way to show (or hide) the progress of a long loop."""

from __future__ import annotations

from contextlib import contextmanager


class _Silent:
    """Stands in for a bar when progress is off: the loop's calls cost nothing."""

    def update(self, n: int = 1):
        pass

    def set_postfix(self, *args, **kwargs):
        pass


@contextmanager
def progress_bar(enabled: bool, total: int, unit: str, desc: str, initial: int = 0):
    """A tqdm bar (closed on exit, also on errors), or a silent stand-in when `enabled` is false."""
    if not enabled:
        yield _Silent()
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=initial, unit=unit, desc=desc, dynamic_ncols=True)
    try:
        yield bar
    finally:
        bar.close()
