"""Task <-> DynamoDB item conversion, the listing cursor and ``DynamoTaskStore.from_url``: no network."""

from __future__ import annotations

import math
from decimal import Decimal
from typing import Any

import pytest

pytest.importorskip("boto3")

from sdasync.backends.aws.dynamo_items import (
    change_attrs,
    decode_cursor,
    deserialize,
    encode_change,
    encode_cursor,
    float_paths,
    free_form,
    item_to_task,
    list_key,
    restore_floats,
    serialize,
    task_to_item,
    tenant_token,
    transition_condition,
    update_expression,
)
from sdasync.backends.aws.dynamo_records import item_to_record, record_key
from sdasync.backends.aws.dynamo_tenants import TenantCache, listing_index, tenant_condition, token_of_item
from sdasync.backends.aws.dynamodb import DynamoTaskStore
from sdasync.backends.records import encode_data
from sdasync.errors import ConfigError, RequestError
from sdasync.models import Api, AttemptRecord, Task, TaskError, TaskStatus
from sdasync.outbox import DeliveryAttempt, Event, Outbox, OutboxState

DAY = 86400.0

NESTED: dict[str, Any] = {
    "prompt": "ünïcode ☃", "negative_prompt": "", "seed": 4294967295, "steps": 20, "cfg_scale": 7.5,
    "denoising_strength": 0.1, "tiny": 1e-7, "negative": -3, "big": 2**62, "restore_faces": False, "tiling": True,
    "styles": [], "override_settings": {}, "script_args": [None, 0, 0.25, "", {"k": [1, {"deep": None}]}],
    "alwayson_scripts": {"controlnet": {"args": [{"enabled": True, "weight": 1.5, "image": None}]}},
}


OUTBOX = Outbox(event_id="msg_1", event=Event.COMPLETED, created_at=1_700_000_000.0, due_at=1_700_000_030.0,
                attempts=(DeliveryAttempt(at=1_700_000_001.0, status=None, error="refused"),), version=3)

HISTORY = (
    {"attempt": 1, "worker": "host-0:9", "started_at": 1_700_000_000.5, "ended_at": 1_700_000_000.75,
     "outcome": "retried", "error": {"code": "engine_unavailable", "message": "down"}},
    {"attempt": 2, "worker": None, "started_at": None, "ended_at": 1_700_000_001.25, "outcome": "lost", "error": None},
)


def full_task() -> Task:
    return Task(
        task_id="full-task", api=Api.IMG2IMG, payload=NESTED, status=TaskStatus.FAILED,
        created_at=1_700_000_000.123456, updated_at=1_700_000_012.654321, started_at=1_700_000_001.5,
        finished_at=1_700_000_012.25, attempts=3, images=("full-task/0.png", "x/1.png"),
        info={"seed": 42, "all_seeds": [42, 43], "infotexts": [""], "extra": {}}, error=TaskError("engine_error", "x"),
        progress={"fraction": 0.5, "eta_s": None}, worker="host-1:123", extra={"client": "cli", "tags": ["a"]},
        lease_until=1_700_000_042.125, history=HISTORY,
    )


@pytest.mark.parametrize("task", [
    full_task(),
    Task(task_id="minimal", api=Api.TXT2IMG, payload={}, created_at=1_700_000_000.0, updated_at=1_700_000_000.0),
    Task(task_id="zero", api=Api.TXT2IMG, payload={"a": 1}, info={}, progress={}, images=()),
    Task(task_id="tenant", api=Api.TXT2IMG, payload={}, tenant="acme-2", outbox=OUTBOX, status=TaskStatus.SUCCEEDED),
])
def test_a_task_survives_the_round_trip(task: Task) -> None:
    got = item_to_task(task_to_item(task, retention_s=30 * DAY))

    assert got == task
    assert (type(got.api), type(got.status), type(got.images)) == (Api, TaskStatus, tuple)
    assert got.error is None or type(got.error) is TaskError
    for name in ("created_at", "updated_at"):
        assert type(getattr(got, name)) is float
    assert type(got.attempts) is int
    assert got.lease_until is None or type(got.lease_until) is float
    assert type(got.history) is tuple and all(type(record) is AttemptRecord for record in got.history)


def test_numbers_come_back_as_int_or_float_never_decimal() -> None:
    payload = item_to_task(task_to_item(full_task(), retention_s=DAY)).payload

    assert payload == NESTED
    assert (type(payload["seed"]), type(payload["steps"]), type(payload["big"])) == (int, int, int)
    assert (type(payload["cfg_scale"]), type(payload["tiny"])) == (float, float)
    assert payload["restore_faces"] is False and payload["tiling"] is True

    def walk(value: Any) -> None:
        assert not isinstance(value, Decimal)
        for child in (value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()):
            walk(child)

    walk(payload)


def test_an_integral_float_reads_back_as_an_equal_int() -> None:
    # Real DynamoDB stores 7.0 as 7; deciding by value makes moto and AWS agree.
    assert deserialize({"N": "7"}) == 7.0
    assert type(deserialize(serialize(7.0))) is int
    assert deserialize({"N": "7.50"}) == 7.5


def test_integral_floats_are_listed_in_a_sidecar_and_come_back_as_floats() -> None:
    payload = {"cfg_scale": 7.0, "steps": 20, "grid": [0.0, 1, {"w": 1.0, "h": 2}], "half": 0.5, "flag": True}
    task = Task(task_id="t", api=Api.TXT2IMG, payload=payload, created_at=1.0, updated_at=1.0, info={"n": 3})
    item = task_to_item(task, retention_s=DAY)

    assert deserialize(item["payloadFloats"]) == [["cfg_scale"], ["grid", 0], ["grid", 2, "w"]]
    assert "infoFloats" not in item  # only a field with integral floats has one
    got = item_to_task(item).payload
    assert got == payload
    assert [type(v) for v in (got["cfg_scale"], got["steps"], got["grid"][0], got["grid"][1], got["grid"][2]["w"],
                              got["grid"][2]["h"], got["half"], got["flag"])] == [
        float, int, float, int, float, int, float, bool]
    # An item written before sidecars existed reads as it always did: integral numbers as ints.
    del item["payloadFloats"]
    assert type(item_to_task(item).payload["cfg_scale"]) is int


def test_a_sidecar_that_does_not_match_the_value_only_restores_what_it_finds() -> None:
    value = {"a": 1, "b": [2, "x"], "c": True}

    restored = restore_floats(value, [["a"], ["b", 5], ["b", 1], ["c"], ["nope", 0], [], "junk", [["a"]]])

    assert restored == {"a": 1.0, "b": [2, "x"], "c": True}
    assert type(restored["a"]) is float and restored["c"] is True
    assert restore_floats({"a": 1}, "not a list") == {"a": 1}


def test_free_form_sets_or_removes_the_sidecar_with_its_field() -> None:
    assert float_paths([1.0, 1, 1.5, {"k": -0.0}]) == [[0], [3, "k"]]
    assert free_form("info", {"x": 1.0}) == ({"info": {"x": 1.0}, "infoFloats": [["x"]]}, [])
    assert free_form("info", {"x": 1}) == ({"info": {"x": 1}}, ["infoFloats"])
    assert free_form("info", None) == ({}, ["info", "infoFloats"])


def test_items_hold_plain_typed_attributes() -> None:
    task = full_task()
    item = task_to_item(task, retention_s=30 * DAY)

    assert item["taskId"] == {"S": "full-task"}
    assert item["status"] == {"S": "failed"}
    assert item["api"] == {"S": "/sdapi/v1/img2img"}
    assert set(item["payload"]) == {"M"}  # a map, never a JSON string
    assert item["payload"]["M"]["cfg_scale"] == {"N": "7.5"}
    assert item["payload"]["M"]["negative_prompt"] == {"S": ""}
    assert item["payload"]["M"]["styles"] == {"L": []}
    assert item["createdAt"] == {"N": "1700000000.123456"}
    assert item["images"] == {"L": [{"S": "full-task/0.png"}, {"S": "x/1.png"}]}
    assert item["error"] == {"M": {"code": {"S": "engine_error"}, "message": {"S": "x"}}}
    assert item["expiresAt"] == {"N": str(math.ceil(task.created_at + 30 * DAY))}
    assert item["listAll"] == {"S": "tasks"}
    assert item["listKey"] == {"S": "0001700000000.123456#full-task"}
    assert item["leaseUntil"] == {"N": "1700000042.125"}
    assert item["history"]["L"][1] == {"M": {
        "attempt": {"N": "2"}, "worker": {"NULL": True}, "started_at": {"NULL": True},
        "ended_at": {"N": "1700000001.25"}, "outcome": {"S": "lost"}, "error": {"NULL": True}}}


def test_unset_optional_fields_are_absent_not_null() -> None:
    item = task_to_item(Task(task_id="t", api=Api.TXT2IMG, payload={}), retention_s=DAY)

    assert not {"startedAt", "finishedAt", "info", "error", "progress", "worker", "leaseUntil"} & set(item)
    assert item["attempts"] == {"N": "0"}
    assert item["images"] == {"L": []}
    assert item["history"] == {"L": []}


def test_an_item_from_before_leases_and_histories_reads_back_without_them() -> None:
    item = task_to_item(full_task(), retention_s=DAY)
    del item["leaseUntil"], item["history"]

    got = item_to_task(item)

    assert (got.lease_until, got.history) == (None, ())


def test_list_key_orders_by_time_then_id_as_strings() -> None:
    keys = [list_key(t, i) for t, i in [(9.5, "b"), (10.0, "a"), (10.0, "b"), (1e10, "a"), (1_700_000_000.1, "z")]]
    # Plain string order (DynamoDB's, on the index sort key) is numeric time order, then id order.
    assert sorted(keys) == sorted(keys, key=lambda k: (float(k.split("#")[0]), k.split("#")[1]))
    assert len({len(k.split("#")[0]) for k in keys}) == 1


@pytest.mark.parametrize("value", [math.nan, math.inf, {"x": [-math.inf]}, 10**40, object()])
def test_values_dynamodb_cannot_hold_are_value_errors(value: Any) -> None:
    with pytest.raises(ValueError, match="cannot store"):
        serialize(value)


@pytest.mark.parametrize(("name", "value"), [
    ("images", "0.png"), ("images", [1]), ("attempts", "1"), ("attempts", True), ("error", {"code": "x"}),
    ("error", "boom"), ("info", [1]), ("progress", "half"), ("history", "retried"), ("history", {"attempt": 1}),
    ("history", [1]),
])
def test_changes_of_the_wrong_shape_are_refused(name: str, value: Any) -> None:
    with pytest.raises(ValueError, match="must be"):
        encode_change(name, value)


def test_changes_are_encoded_as_plain_values() -> None:
    assert encode_change("images", ("a", "b")) == ["a", "b"]
    assert encode_change("error", TaskError("c", "m")) == {"code": "c", "message": "m"}
    assert encode_change("error", {"code": "c", "message": "m"}) == {"code": "c", "message": "m"}
    assert encode_change("started_at", 5) == 5.0
    assert encode_change("lease_until", 1_700_000_060) == 1_700_000_060.0
    assert encode_change("history", HISTORY) == list(HISTORY)
    assert encode_change("history", ()) == []  # an empty list, as images: only None removes an attribute
    assert all(encode_change(name, None) is None
               for name in ("error", "info", "progress", "worker", "finished_at", "lease_until"))


def test_update_expression_sets_and_removes_through_placeholders() -> None:
    update, names, values = update_expression({"status": "running", "leaseUntil": 5.5}, ["progress"])

    assert update == "SET #s0 = :s0, #s1 = :s1 REMOVE #r0"
    assert names == {"#s0": "status", "#s1": "leaseUntil", "#r0": "progress"}
    assert values == {":s0": {"S": "running"}, ":s1": {"N": "5.5"}}
    with pytest.raises(ValueError, match="cannot store"):
        update_expression({"leaseUntil": math.nan}, [])


def test_transition_condition_adds_attempt_and_lease_clauses() -> None:
    condition, names, values = transition_condition(["queued", "running"], None, None)
    assert condition == "attribute_exists(#key) AND #status IN (:e0, :e1)"
    assert names == {"#key": "taskId", "#status": "status"}
    assert values == {":e0": {"S": "queued"}, ":e1": {"S": "running"}}

    condition, names, values = transition_condition(["running"], 2, 1_700_000_000.5)
    assert condition == ("attribute_exists(#key) AND #status IN (:e0) AND #attempts = :attempt"
                         " AND (#status <> :running OR attribute_not_exists(#lease) OR #lease < :leaseEnd)")
    assert (names["#attempts"], names["#lease"]) == ("attempts", "leaseUntil")
    assert (values[":attempt"], values[":running"], values[":leaseEnd"]) == (
        {"N": "2"}, {"S": "running"}, {"N": "1700000000.5"})
    # Never the placeholders update_expression uses, so one request can carry both.
    assert not set(names) & {"#s0", "#r0"} and not set(values) & {":s0"}


def test_cursor_round_trip_and_refusals() -> None:
    key = list_key(1_700_000_000.5, "abc")
    cursor = encode_cursor(key, "abc", "queued")

    assert decode_cursor(cursor, "queued") == (key, "abc")
    for status in (None, "running"):
        with pytest.raises(RequestError) as caught:
            decode_cursor(cursor, status)
        assert caught.value.field == "cursor"
    for forged in (encode_cursor("x#abc", "abc", None), encode_cursor(key, "other", None)):
        with pytest.raises(RequestError):
            decode_cursor(forged, None)


def test_a_cursor_belongs_to_its_tenant_filter() -> None:
    key = list_key(1_700_000_000.5, "abc")
    cursor = encode_cursor(key, "abc", None, "acme")

    assert decode_cursor(cursor, None, "acme") == (key, "abc")
    for tenant in (None, "", "zeta"):
        with pytest.raises(RequestError) as caught:
            decode_cursor(cursor, None, tenant)
        assert caught.value.field == "cursor"
    with pytest.raises(RequestError):
        decode_cursor(encode_cursor(key, "abc", None, None), None, "")  # "" is a tenant, not "no filter"


def test_tenant_items_carry_a_token_and_tenant_status() -> None:
    plain = {name: deserialize(value) for name, value in task_to_item(
        Task(task_id="t", api=Api.TXT2IMG, payload={}, tenant="acme"), retention_s=DAY).items()}
    blank = {name: deserialize(value) for name, value in task_to_item(
        Task(task_id="t", api=Api.TXT2IMG, payload={}), retention_s=DAY).items()}

    assert (plain["tenant"], plain["tenantStatus"]) == ("acme", "acme#queued")
    assert (blank["tenant"], blank["tenantStatus"]) == ("-", "-#queued")
    assert not {"outbox", "outboxPart", "outboxDue"} & set(plain)
    for bad in ("-", "Acme", "a#b", "x" * 64):
        with pytest.raises(ValueError, match="invalid tenant"):
            tenant_token(bad)
    assert token_of_item({}) == "-"  # an item of a version before tenants is tenant ""


def test_listing_reads_the_tenant_indexes_only_for_a_tenant() -> None:
    assert listing_index(None, None) == ("byCreated", "listAll", "tasks")
    assert listing_index("queued", None) == ("byStatus", "status", "queued")
    assert listing_index(None, "acme") == ("byTenant", "tenant", "acme")
    assert listing_index("running", "") == ("byTenantStatus", "tenantStatus", "-#running")
    # Only tenant "" may match an item without the attribute (and the transition then writes it).
    assert "attribute_not_exists" in tenant_condition("-")[0]
    assert "attribute_not_exists" not in tenant_condition("acme")[0]


def test_an_outbox_change_sets_or_removes_the_due_index_keys() -> None:
    sets, removes = change_attrs({"outbox": OUTBOX})
    assert (sets["outboxPart"], sets["outboxDue"], sets["outbox"]["version"]) == ("due", 1_700_000_030.0, 3)
    assert removes == []
    settled = OUTBOX.tried(DeliveryAttempt(at=1.0, status=200), due_at=None, state=OutboxState.DELIVERED)
    sets, removes = change_attrs({"outbox": settled})
    assert "outboxPart" not in sets and set(removes) == {"outboxPart", "outboxDue"}
    assert change_attrs({"outbox": None}) == ({}, ["outbox", "outboxPart", "outboxDue"])
    item = task_to_item(Task(task_id="t", api=Api.TXT2IMG, payload={}, outbox=OUTBOX), retention_s=DAY)
    assert (item["outboxPart"], item["outboxDue"]) == ({"S": "due"}, {"N": "1700000030.0"})


def test_the_tenant_cache_forgets_the_least_recently_used() -> None:
    cache = TenantCache(size=2)
    cache.put("a", "acme")
    cache.put("b", "-")
    assert cache.get("a") == "acme"  # a is now the most recent
    cache.put("c", "zeta")
    assert (cache.get("a"), cache.get("b"), cache.get("c")) == ("acme", None, "zeta")
    cache.forget("a")
    assert cache.get("a") is None


@pytest.mark.parametrize("data", [[1], {"k": (1, 2)}, {1: "int key"}, {"nan": math.nan}, {"s": {1, 2}},
                                  {"big": "x" * (64 * 1024)}])
def test_record_data_that_would_not_read_back_equal_is_refused(data: Any) -> None:
    with pytest.raises(ValueError, match="record data"):
        encode_data(data)


def test_a_record_item_reads_back() -> None:
    item = {**record_key("idem", "acme#h"), "listAll": {"S": "rec#idem"}, "listKey": {"S": "acme#h"},
            "data": {"S": '{"task":"t1","n":1.0}'}, "version": {"N": "4"}, "expiresAt": {"N": "1700000000.25"}}
    record = item_to_record(item)
    assert (record.kind, record.key, record.data, record.version, record.expires_at) == (
        "idem", "acme#h", {"task": "t1", "n": 1.0}, 4, 1_700_000_000.25)
    assert type(record.data["n"]) is float
    assert record_key("idem", "acme#h") == {"taskId": {"S": "rec#idem#acme#h"}}


# DynamoTaskStore.from_url only parses ---------------------------------------------------------------------------


def test_from_url_parses_table_and_region_and_takes_the_retention_setting() -> None:
    store = DynamoTaskStore.from_url("dynamodb://sd_tasks?region=eu-west-1", retention_days=7.5)

    assert (store.table, store.region, store.retention_s) == ("sd_tasks", "eu-west-1", 7.5 * DAY)
    assert store.capabilities == frozenset({"list", "cas", "ttl", "expires"})
    assert DynamoTaskStore.from_url("dynamodb://My.Tasks-1/").table == "My.Tasks-1"
    assert DynamoTaskStore.from_url("dynamodb://sd_tasks").retention_s == 30 * DAY


@pytest.mark.parametrize(("url", "match"), [
    ("dynamodb://sd_tasks?ttl=3", "valid: region$"),
    # One retention for every backend: the URL's own parameter would disagree with --retention-days.
    ("dynamodb://sd_tasks?retention_days=7", "--retention-days"),
    ("dynamodb://sd_tasks?region=x&retention_days=soon", "--retention-days"),
    ("dynamodb://ab", "table name"),
    ("dynamodb://", "table name"),
    ("dynamodb://bad%20name", "table name"),
    ("dynamodb://user@tasks", "table name"),
    ("dynamodb://" + "x" * 256, "table name"),
    ("dynamodb://sd_tasks/extra", "without a path"),
])
def test_from_url_refuses_bad_urls(url: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        DynamoTaskStore.from_url(url)


def test_a_retention_that_is_not_positive_is_refused() -> None:
    with pytest.raises(ConfigError, match="positive"):
        DynamoTaskStore.from_url("dynamodb://sd_tasks", retention_days=0)
