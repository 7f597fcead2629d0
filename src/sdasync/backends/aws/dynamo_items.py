"""Task <-> DynamoDB item conversion and the listing cursor for ``DynamoTaskStore``. Pure: no client, no network.

An item holds plain, typed attributes (``payload`` is a map ``M``, timestamps are numbers ``N``), never a JSON
string, so the DynamoDB console, PartiQL and CloudWatch contributor insights can read it, and a client never sees
DynamoDB's typed JSON: the store hands out ``Task`` objects only.

Numbers: DynamoDB has one number type with 38 digits of precision, and boto3 refuses Python floats. Floats go in
as ``Decimal(repr(x))`` (the shortest string that reads back as the same float) and numbers come out as ``int``
when integral, else ``float``. Real DynamoDB normalises ``7.0`` to ``7``, so the number alone cannot say whether
it was a float: for each free-form field (``payload``, ``info``, ``progress``, ``extra``, ``history``) that holds
integral floats, a sidecar attribute ``<attr>Floats`` lists their paths (``[["cfg_scale"], ["all_seeds", 0]]``),
and reading turns those numbers back into floats. A task then reads back equal to the one written, type for
type, on moto and AWS alike, with the item still readable; an item written before sidecars existed (none) reads
as before, integral numbers as ints. The timestamp fields of a Task are always returned as floats and
``attempts`` as an int.
"""

from __future__ import annotations

import decimal
import math
import re
from collections.abc import Collection, Mapping
from decimal import Decimal
from typing import Any

from boto3.dynamodb.types import TypeDeserializer, TypeSerializer

from sdasync.backends.cursor import decode_cursor as _decode
from sdasync.backends.cursor import encode_cursor as _encode
from sdasync.errors import RequestError
from sdasync.models import TENANT_FORMAT, Api, Task, TaskError, TaskStatus, plain_field

#: The table's partition key, as the original README created it (``sd_tasks``, ``taskId`` string).
KEY = "taskId"
#: Index over every task, newest first: constant partition ``LIST_ALL_ATTR = LIST_ALL_VALUE``, sort ``LIST_KEY``.
INDEX_ALL = "byCreated"
#: Index by status, newest first: partition ``status``, sort ``LIST_KEY``.
INDEX_STATUS = "byStatus"
LIST_ALL_ATTR = "listAll"
LIST_ALL_VALUE = "tasks"
LIST_KEY = "listKey"
#: The index over (status, updatedAt) that ``stale`` queries (keys only).
INDEX_UPDATED = "byUpdated"
UPDATED_AT = "updatedAt"
#: The TTL attribute (epoch seconds); DynamoDB deletes the item some time (up to days) after it passes.
EXPIRES_AT = "expiresAt"
#: A tenant's listings, newest first: partition ``TENANT`` (the tenant's token), sort ``LIST_KEY``; and by status,
#: partition ``TENANT_STATUS`` = ``f"{token}#{status}"``, which every transition rewrites with ``status``.
INDEX_TENANT = "byTenant"
INDEX_TENANT_STATUS = "byTenantStatus"
TENANT = "tenant"
TENANT_STATUS = "tenantStatus"
#: The token of tenant "" (key-less mode): an index key cannot be empty, and no TENANT_FORMAT name starts with "-".
NO_TENANT = "-"
#: The sparse index of due outboxes (keys only): partition ``OUTBOX_PART`` (always ``OUTBOX_PART_VALUE``), sort
#: ``OUTBOX_DUE`` (epoch seconds), both present only while the task's ``outbox.due_at`` is set.
INDEX_OUTBOX = "byOutboxDue"
OUTBOX_PART = "outboxPart"
OUTBOX_PART_VALUE = "due"
OUTBOX_DUE = "outboxDue"

#: Task field -> item attribute, for every field a transition may change.
CHANGE_ATTRS: Mapping[str, str] = {
    "attempts": "attempts", "started_at": "startedAt", "finished_at": "finishedAt", "images": "images",
    "info": "info", "error": "error", "progress": "progress", "worker": "worker", "lease_until": "leaseUntil",
    "history": "history", "outbox": "outbox",
}

#: Task field -> item attribute, for the free-form fields whose integral floats get a sidecar (see the docstring).
FREE_FORM_ATTRS: Mapping[str, str] = {
    "payload": "payload", "extra": "extra", "info": "info", "progress": "progress", "history": "history",
}
FLOATS_SUFFIX = "Floats"

_LIST_KEY_FORMAT = re.compile(r"\d{13}\.\d{6}#.+", re.DOTALL)
_serializer = TypeSerializer()
_deserializer = TypeDeserializer()


def list_key(created_at: float, task_id: str) -> str:
    """The sort key of both listing indexes: fixed-width creation time, then the id that breaks ties.

    One string attribute because a GSI sort key is one attribute, and DynamoDB leaves the order of equal sort keys
    undefined. Fixed width (13 integer digits, microseconds) makes string order equal numeric order for any
    non-negative epoch time; the ``#`` always sits at the same position, so the id comparison starts only on equal
    times, as in SQLite's ``ORDER BY created_at DESC, task_id DESC``."""
    return f"{max(created_at, 0.0):020.6f}#{task_id}"


def tenant_token(tenant: str) -> str:
    """The value of a task's ``tenant`` attribute, and of its index partitions. Raises ValueError for a name
    outside ``TENANT_FORMAT``: it could collide with the token of "" or split ``tenantStatus`` wrongly."""
    if tenant == "":
        return NO_TENANT
    if not isinstance(tenant, str) or not TENANT_FORMAT.fullmatch(tenant):
        raise ValueError(f"invalid tenant {tenant!r}: {TENANT_FORMAT.pattern}")
    return tenant


def tenant_of_token(token: Any) -> str:
    """The tenant an item's ``tenant`` attribute names; absent (an item of a version before tenants) is ""."""
    return "" if token is None or token == NO_TENANT else str(token)


def tenant_status(token: str, status: str) -> str:
    return f"{token}#{status}"


def outbox_attrs(outbox: Mapping[str, Any] | None) -> tuple[dict[str, Any], list[str]]:
    """The due index's attributes to set and remove for a task whose outbox is now ``outbox`` (plain, or None).

    The outbox itself is a plain map without a float sidecar: ``Outbox.from_dict`` makes its numbers floats and
    ints again by itself. The index keys exist only while ``due_at`` is set, so delivered and abandoned outboxes
    drop out of the sparse index and ``due_outbox`` costs what it returns."""
    due = None if outbox is None else outbox.get("due_at")
    if due is None:
        return {}, [OUTBOX_PART, OUTBOX_DUE]
    return {OUTBOX_PART: OUTBOX_PART_VALUE, OUTBOX_DUE: float(due)}, []


def expires_at(from_time: float, retention_s: float) -> int:
    # TTL wants whole epoch seconds; rounding up never expires a task early.
    return math.ceil(from_time + retention_s)


def to_dynamo(value: Any) -> Any:
    """``value`` with every float as a Decimal (recursively), ready for TypeSerializer.

    Raises ValueError for what DynamoDB cannot hold (NaN, infinities, numbers beyond 38 digits)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"DynamoDB cannot store {value!r}")
        return Decimal(repr(value))
    if isinstance(value, int):
        return value
    if isinstance(value, Mapping):
        return {str(key): to_dynamo(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [to_dynamo(item) for item in value]
    raise ValueError(f"cannot store a {type(value).__name__} in a task")


def from_dynamo(value: Any) -> Any:
    """The inverse of ``to_dynamo`` on deserialized values: Decimals become ints (when integral) or floats."""
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, dict):
        return {key: from_dynamo(item) for key, item in value.items()}
    if isinstance(value, list):
        return [from_dynamo(item) for item in value]
    if isinstance(value, set | frozenset):  # string/number sets are never written by us, but read them sanely
        return sorted(from_dynamo(item) for item in value)
    return value


FloatPath = list[str | int]


def float_paths(value: Any, path: tuple[str | int, ...] = ()) -> list[FloatPath]:
    """The paths of the integral floats inside ``value`` (map keys and list indexes, outermost first): the
    numbers DynamoDB would hand back as ints."""
    if isinstance(value, float):
        return [list(path)] if value.is_integer() else []
    if isinstance(value, Mapping):
        return [found for key, item in value.items() for found in float_paths(item, (*path, str(key)))]
    if isinstance(value, list | tuple):
        return [found for index, item in enumerate(value) for found in float_paths(item, (*path, index))]
    return []


def restore_floats(value: Any, paths: Any) -> Any:
    """``value`` with the numbers at ``paths`` (from ``float_paths``) made floats again. A path that does not lead
    to a number (an item someone edited by hand) is skipped: the sidecar only ever restores a type."""
    if not isinstance(paths, list):
        return value
    for path in paths:
        if isinstance(path, list) and path:
            _restore(value, path)
    return value


def _restore(container: Any, path: list[Any]) -> None:
    *parents, last = path
    for step in parents:
        container = _step(container, step)
    number = _step(container, last)
    if isinstance(number, int) and not isinstance(number, bool):
        container[last] = float(number)  # _step found it there, so the index or key is valid


def _step(container: Any, step: Any) -> Any:
    if isinstance(container, dict) and isinstance(step, str):
        return container.get(step)
    if isinstance(container, list) and isinstance(step, int) and 0 <= step < len(container):
        return container[step]
    return None


def free_form(attr: str, value: Any) -> tuple[dict[str, Any], list[str]]:
    """The attributes to set and to remove for a free-form field ``attr`` holding plain ``value`` (None: remove
    it): the value and, when it holds integral floats, its ``<attr>Floats`` sidecar."""
    sidecar = attr + FLOATS_SUFFIX
    if value is None:
        return {}, [attr, sidecar]
    paths = float_paths(value)
    return ({attr: value, sidecar: paths}, []) if paths else ({attr: value}, [sidecar])


def change_attrs(changes: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The attributes to set (plain values) and to remove for a transition's ``changes`` (checked field names).
    Raises ValueError for a value of the wrong shape."""
    sets: dict[str, Any] = {}
    removes: list[str] = []
    for field, value in changes.items():
        encoded = encode_change(field, value)
        if field in FREE_FORM_ATTRS:
            # The field and its float sidecar change together.
            field_sets, field_removes = free_form(CHANGE_ATTRS[field], encoded)
            sets.update(field_sets)
            removes.extend(field_removes)
        # REMOVE rather than SET NULL: an unset field is an absent attribute, as task_to_item writes it.
        elif encoded is None:
            removes.append(CHANGE_ATTRS[field])
        else:
            sets[CHANGE_ATTRS[field]] = encoded
        if field == "outbox":
            # The due index follows the outbox in the same write.
            index_sets, index_removes = outbox_attrs(encoded)
            sets.update(index_sets)
            removes.extend(index_removes)
    return sets, removes


def serialize(value: Any) -> dict[str, Any]:
    """One attribute value in DynamoDB's typed form (``{"M": ...}``). Raises ValueError when it cannot be."""
    try:
        result: dict[str, Any] = dict(_serializer.serialize(to_dynamo(value)))
    except (TypeError, decimal.DecimalException) as exc:  # boto3 traps Inexact/Rounded: over 38 digits
        raise ValueError(f"DynamoDB cannot store {value!r}: {exc}") from exc
    return result


def deserialize(attribute: Mapping[str, Any]) -> Any:
    typed: Any = dict(attribute)
    return from_dynamo(_deserializer.deserialize(typed))


def encode_change(name: str, value: Any) -> Any:
    """A mutable field's plain attribute value, or None to remove the attribute. Raises ValueError for a value of
    the wrong shape (``models.plain_field``: the same rules as every store)."""
    return plain_field(name, value)


def task_to_item(task: Task, *, retention_s: float) -> dict[str, Any]:
    """The whole item for a new task, in typed form. Optional fields that are None are left out, not NULL, so
    ``attribute_exists`` means "set" and the item stays small. Raises ValueError for values DynamoDB rejects."""
    token = tenant_token(task.tenant)
    plain: dict[str, Any] = {
        KEY: task.task_id,
        "api": str(Api(task.api)),
        "status": str(TaskStatus(task.status)),
        TENANT: token,
        TENANT_STATUS: tenant_status(token, str(TaskStatus(task.status))),
        "createdAt": float(task.created_at),
        UPDATED_AT: float(task.updated_at),
        LIST_ALL_ATTR: LIST_ALL_VALUE,
        LIST_KEY: list_key(task.created_at, task.task_id),
        # Retention counts from creation; a transition to a terminal state restarts it from the end.
        EXPIRES_AT: expires_at(task.created_at, retention_s),
    }
    for field, attr in CHANGE_ATTRS.items():
        value = encode_change(field, getattr(task, field))
        if field in FREE_FORM_ATTRS:
            plain.update(free_form(attr, value)[0])
        elif value is not None:
            plain[attr] = value
    for field in ("payload", "extra"):
        plain.update(free_form(FREE_FORM_ATTRS[field], dict(getattr(task, field)))[0])
    plain.update(outbox_attrs(plain.get(CHANGE_ATTRS["outbox"]))[0])
    return {name: serialize(value) for name, value in plain.items()}


def item_to_task(item: Mapping[str, Any]) -> Task:
    """A Task from a typed item (GetItem, Query, ReturnValues). Unknown attributes are ignored."""
    plain = {name: deserialize(value) for name, value in item.items()}
    for attr in FREE_FORM_ATTRS.values():
        if attr in plain and attr + FLOATS_SUFFIX in plain:
            plain[attr] = restore_floats(plain[attr], plain[attr + FLOATS_SUFFIX])

    def number(name: str) -> float | None:
        value = plain.get(name)
        return None if value is None else float(value)

    error = plain.get("error")
    return Task(
        task_id=str(plain[KEY]),
        api=Api(plain["api"]),
        payload=plain.get("payload") or {},
        status=TaskStatus(plain["status"]),
        created_at=float(plain["createdAt"]),
        updated_at=float(plain[UPDATED_AT]),
        started_at=number("startedAt"),
        finished_at=number("finishedAt"),
        attempts=int(plain.get("attempts", 0)),
        images=tuple(str(key) for key in plain.get("images", ())),
        info=plain.get("info"),
        error=None if error is None else TaskError.from_dict(error),
        progress=plain.get("progress"),
        worker=plain.get("worker"),
        extra=plain.get("extra") or {},
        lease_until=number("leaseUntil"),
        # Absent on items written before histories existed (and tenants, and outboxes).
        history=tuple(plain.get("history", ())),
        tenant=tenant_of_token(plain.get(TENANT)),
        outbox=plain.get("outbox"),
    )


def update_expression(sets: Mapping[str, Any], removes: Collection[str]) -> tuple[str, dict[str, str], dict[str, Any]]:
    """An UpdateExpression that sets ``sets`` (attribute -> plain value) and removes ``removes``, with its attribute
    names and typed values. Raises ValueError for a value DynamoDB cannot hold."""
    # Placeholders for every name: "status" is a reserved word, and so may be any future attribute.
    names = {f"#s{n}": attr for n, attr in enumerate(sets)}
    values = {f":s{n}": serialize(value) for n, value in enumerate(sets.values())}
    update = "SET " + ", ".join(f"#s{n} = :s{n}" for n in range(len(sets)))
    if removes:
        names.update({f"#r{n}": attr for n, attr in enumerate(removes)})
        update += " REMOVE " + ", ".join(f"#r{n}" for n in range(len(removes)))
    return update, names, values


def transition_condition(statuses: Collection[str], attempt: int | None, lease_expired_before: float | None
                         ) -> tuple[str, dict[str, str], dict[str, Any]]:
    """The ConditionExpression of a transition (the item exists, its status is one of ``statuses``, and the
    optional attempt and lease conditions hold), with its attribute names and typed values. Its placeholders
    (``#key``, ``#status``, ``:e0``...) never clash with ``update_expression``'s."""
    names = {"#key": KEY, "#status": "status"}
    values: dict[str, Any] = {f":e{n}": {"S": s} for n, s in enumerate(statuses)}
    condition = f"attribute_exists(#key) AND #status IN ({', '.join(values)})"
    if attempt is not None:
        names["#attempts"] = "attempts"
        values[":attempt"] = {"N": str(int(attempt))}
        condition += " AND #attempts = :attempt"
    if lease_expired_before is not None:
        # One condition with the status: the claim and the holder's heartbeat (conditional on its attempt) are
        # ordered by DynamoDB, so the claim sees the extended lease or the heartbeat finds its attempt superseded.
        # An unset lease is an absent attribute (transition REMOVEs None), hence attribute_not_exists.
        names["#lease"] = CHANGE_ATTRS["lease_until"]
        values[":running"] = {"S": str(TaskStatus.RUNNING)}
        values[":leaseEnd"] = serialize(float(lease_expired_before))
        condition += " AND (#status <> :running OR attribute_not_exists(#lease) OR #lease < :leaseEnd)"
    return condition, names, values


def conflict_message(current: Task, statuses: Collection[str], attempt: int | None,
                     lease_expired_before: float | None) -> str:
    wanted = f"status in {sorted(statuses)}" + ("" if attempt is None else f" and attempt {attempt}")
    if lease_expired_before is not None:
        wanted += f" and no running lease at or after {lease_expired_before}"
    lease = "" if current.lease_until is None else f", leased until {current.lease_until}"
    return f"task {current.task_id} is {current.status} (attempt {current.attempts}{lease}), expected {wanted}"


def encode_cursor(sort_key: str, task_id: str, status: str | None, tenant: str | None = None) -> str:
    """An opaque cursor: the last task's index position (enough to rebuild ExclusiveStartKey) and the status and
    tenant filters of the listing it belongs to."""
    return _encode({"k": sort_key, "t": task_id, "s": status, "n": tenant})


def decode_cursor(cursor: str, status: str | None, tenant: str | None = None) -> tuple[str, str]:
    """The (listKey, taskId) a cursor names. Raises RequestError for anything this store did not hand out."""
    sort_key, task_id, cursor_status, cursor_tenant = _decode(cursor, ("k", "t", "s", "n"))
    if (not isinstance(sort_key, str) or not isinstance(task_id, str) or not _LIST_KEY_FORMAT.fullmatch(sort_key)
            or not sort_key.endswith(f"#{task_id}") or cursor_status != status or cursor_tenant != tenant):
        # A cursor from a listing of another status or tenant would start in another index partition (DynamoDB
        # refuses it) or, worse, in another tenant's tasks.
        raise RequestError("invalid cursor (or one from a listing with another status or tenant filter)",
                           field="cursor")
    return sort_key, task_id
