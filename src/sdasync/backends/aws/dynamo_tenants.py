"""Tenants in ``DynamoTaskStore``: which index a listing reads, and what a transition knows of a task's tenant.

A task item carries ``tenant`` (the tenant's name, or ``"-"`` for tenant "", since an index key cannot be empty and
no ``TENANT_FORMAT`` name starts with ``-``) and ``tenantStatus = f"{tenant}#{status}"``, the partitions of the
``byTenant`` and ``byTenantStatus`` indexes. A tenant's listing is then one Query of its own partition, never a
filter after a query, and the single ``listAll`` partition of ``byCreated`` is no longer the only way in: each
tenant's writes land in index partitions of their own.

``tenantStatus`` must change with ``status``, in the transition's one UpdateItem, and DynamoDB cannot build a string
from an attribute in an UpdateExpression: the transition has to know the tenant. A task's tenant never changes, so
the store remembers it (``TenantCache``) from every task it creates or reads, and reads it (one strong GetItem of
two attributes) only for a task it has not met. The transition is still conditional on the tenant it assumed, so a
wrong entry (a task deleted and recreated under the same id by another tenant) costs a retry, never a wrong index
key.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from sdasync.backends.aws.dynamo_items import (
    INDEX_ALL,
    INDEX_STATUS,
    INDEX_TENANT,
    INDEX_TENANT_STATUS,
    KEY,
    LIST_ALL_ATTR,
    LIST_ALL_VALUE,
    NO_TENANT,
    TENANT,
    TENANT_STATUS,
    tenant_status,
    tenant_token,
)


class TenantCache:
    """Task id -> tenant token, for the most recent ``size`` tasks (a worker or API process meets few at once)."""

    def __init__(self, size: int = 4096) -> None:
        self._size = size
        self._tokens: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, task_id: str) -> str | None:
        with self._lock:
            token = self._tokens.get(task_id)
            if token is not None:
                self._tokens.move_to_end(task_id)
            return token

    def put(self, task_id: str, token: str) -> None:
        with self._lock:
            self._tokens[task_id] = token
            self._tokens.move_to_end(task_id)
            while len(self._tokens) > self._size:
                self._tokens.popitem(last=False)

    def forget(self, task_id: str) -> None:
        with self._lock:
            self._tokens.pop(task_id, None)


def token_of_item(item: Mapping[str, Any]) -> str:
    """The tenant token a typed item carries; an item of a version before tenants belongs to tenant ""."""
    value = item.get(TENANT)
    return NO_TENANT if not value else str(value.get("S", NO_TENANT))


def tenant_condition(token: str) -> tuple[str, dict[str, str], dict[str, Any]]:
    """The clause that makes a transition's tenant attributes right: the item is the assumed tenant's. An item
    without ``tenant`` (an older version's) can only be tenant "", and the transition writes it then."""
    names = {"#tenant": TENANT}
    values = {":tenant": {"S": token}}
    if token == NO_TENANT:
        return "(#tenant = :tenant OR attribute_not_exists(#tenant))", names, values
    return "#tenant = :tenant", names, values


def tenant_sets(token: str, status: str) -> dict[str, str]:
    """What a transition to ``status`` sets beside it (``tenant`` too, which migrates an item of an older version
    and rewrites the same value on any other)."""
    return {TENANT: token, TENANT_STATUS: tenant_status(token, status)}


def listing_index(status: str | None, tenant: str | None) -> tuple[str, str, str]:
    """(index, partition attribute, partition value) of a listing. Raises ValueError for a tenant outside
    ``TENANT_FORMAT``."""
    if tenant is None:
        if status is None:
            return INDEX_ALL, LIST_ALL_ATTR, LIST_ALL_VALUE
        return INDEX_STATUS, "status", status
    token = tenant_token(tenant)
    if status is None:
        return INDEX_TENANT, TENANT, token
    return INDEX_TENANT_STATUS, TENANT_STATUS, tenant_status(token, status)


def read_token(client: Any, table: str, task_id: str) -> str | None:
    """The tenant token of the task ``task_id``, read strongly (two attributes); None when there is no such item.
    botocore errors pass through."""
    response = client.get_item(TableName=table, Key={KEY: {"S": task_id}}, ConsistentRead=True,
                               ProjectionExpression="#k, #t", ExpressionAttributeNames={"#k": KEY, "#t": TENANT})
    item = response.get("Item")
    return None if item is None else token_of_item(item)
