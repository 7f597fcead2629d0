"""Who is asking: the tenant an API key belongs to, or the local operator of key-less mode."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sdasync.auth.keys import ApiKey
    from sdasync.models import Task


@dataclass(frozen=True)
class Caller:
    #: The tenant whose tasks the caller sees and creates ("" in key-less mode).
    tenant: str
    #: Operators see every tenant's tasks (listing, dlq, metrics); tenants never do.
    admin: bool = False
    #: The key the request presented; None in key-less mode.
    key: ApiKey | None = None

    def sees(self, task: Task) -> bool:
        return self.admin or task.tenant == self.tenant


#: Key-less mode (``make run`` on loopback): the one person at the keyboard, who sees everything.
LOCAL = Caller(tenant="", admin=True)
