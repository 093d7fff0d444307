"""Progress bars for long work: shown on stderr only when the work lasts over a second."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")
DELAY_S = 1.0  # a bar appears only once the work has lasted this long


def progress(items: Iterable[T], desc: str, total: int | None = None, enabled: bool = True) -> Iterator[T]:
    """Iterate ``items`` with a tqdm bar that appears after 1 s (never for quick work).

    Disabled when ``enabled`` is False or ``GRACE_NO_PROGRESS=1`` is set.
    """
    if not enabled or os.environ.get("GRACE_NO_PROGRESS") == "1":
        yield from items
        return
    from tqdm.auto import tqdm

    yield from tqdm(items, desc=desc, total=total, delay=DELAY_S, leave=False, dynamic_ncols=True)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str, unit: str = "it", enabled: bool = True) -> Any:
    """A bar updated by hand (``bar.update(n)``, ``bar.close()``) for work that is not one loop over items;
    the same rules as :func:`progress` (after 1 s, off with ``enabled=False`` or ``GRACE_NO_PROGRESS=1``)."""
    if not enabled or os.environ.get("GRACE_NO_PROGRESS") == "1":
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, delay=DELAY_S, leave=False, dynamic_ncols=True)
