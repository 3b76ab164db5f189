"""One nursery idiom shared by the modules that run helper tasks.

trio wraps whatever leaves a nursery in an ExceptionGroup. A helper that hides its
nursery inside an async context manager should not change what its caller sees: a
single error comes out as itself, so ``except SessionError`` keeps working.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio


@asynccontextmanager
async def open_nursery() -> AsyncIterator[trio.Nursery]:
    try:
        async with trio.open_nursery() as nursery:
            yield nursery
    except BaseExceptionGroup as group:
        raise single(group) from None


def single(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one real error in a group (Cancelled aside), or the group itself."""
    leaves = list(_leaves(group))
    real = [exc for exc in leaves if not isinstance(exc, trio.Cancelled)]
    if len(real) == 1:
        return real[0]
    if not real:
        return leaves[0]
    return group


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]
