"""The ``Fleet`` Protocol: the one thing the control loop needs from whatever runs the workers.

A fleet counts its workers in two groups, running and pending (launched but not yet taking tasks: a booting
instance), because the policy must not launch again for capacity that is already on its way. ``set_desired``
is declarative and idempotent: the loop may call it every tick with the same number.
"""

from __future__ import annotations

from typing import Any, Protocol, Self, runtime_checkable


@runtime_checkable
class Fleet(Protocol):
    #: What differs between fleets, as data: ``"drain"`` (scale-in lets running tasks finish), ``"remote"``
    #: (capacity is an AWS resource the scaler does not own).
    capabilities: frozenset[str]

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> Self:
        """Parse ``url`` (and ``kwargs``); opens nothing. Raises ConfigError for a bad URL or parameter."""
        ...

    def capacity(self) -> tuple[int, int]:
        """``(running, pending)`` workers now. Raises BackendError (retryable) or ConfigError."""
        ...

    def set_desired(self, n: int) -> None:
        """Ask for ``n`` workers (clamped to what the fleet allows). Scale-in lets busy workers drain where the
        fleet can (see each module). Raises BackendError, BackendRefused or ConfigError."""
        ...

    def close(self) -> None:
        """Release clients; a local fleet also stops its workers (they drain). Raises nothing."""
        ...

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc: object) -> None: ...
