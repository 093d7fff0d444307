"""Progress bars for long work: shown on stderr only when the work lasts over a second."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], desc: str, total: int | None = None, enabled: bool = True) -> Iterator[T]:
    """Iterate ``items`` with a tqdm bar that appears after 1 s (never for quick work).

    Disabled when ``enabled`` is False or ``GRACE_NO_PROGRESS=1`` is set.
    """
    if not enabled or os.environ.get("GRACE_NO_PROGRESS") == "1":
        yield from items
        return
    from tqdm.auto import tqdm

    yield from tqdm(items, desc=desc, total=total, delay=1.0, leave=False, dynamic_ncols=True)
