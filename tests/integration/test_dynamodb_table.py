"""DynamoTaskStore against a moto_server: the table's shape, a table made by hand, ensure(), the raw items."""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest

pytest.importorskip("boto3")

import boto3

from sdasync.backends.aws.dynamodb import DynamoTaskStore
from sdasync.errors import BackendRefused, ConfigError, RecordConflict, RequestError, TaskConflict, TaskNotFound
from sdasync.models import Api, AttemptRecord, Task, TaskError, TaskStatus
from sdasync.outbox import Event, Outbox

DAY = 86400.0
Q, R, S = TaskStatus.QUEUED, TaskStatus.RUNNING, TaskStatus.SUCCEEDED
OUTBOX = Outbox(event_id="msg_0123", event=Event.COMPLETED, created_at=1_700_000_010.0, due_at=1_700_000_010.0)


@pytest.fixture
def raw(aws_endpoint: str) -> Iterator[Any]:
    """A plain boto3 client, as an operator (or the original sample's code) would use."""
    client = boto3.client("dynamodb")
    yield client
    client.close()


@pytest.fixture
def table_name() -> str:
    return f"sd_tasks-{uuid.uuid4().hex[:12]}"


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_task(task_id: str, created_at: float = 1_700_000_000.0, **fields: Any) -> Task:
    return Task(task_id=task_id, api=Api.TXT2IMG, payload={"prompt": "a cat", "steps": 20, "cfg_scale": 7.5},
                created_at=created_at, updated_at=created_at, **fields)


def create_by_hand(raw: Any, name: str, *, provisioned: bool) -> None:
    """The table exactly as the original README makes it: name and partition key taskId (string), nothing else."""
    billing: dict[str, Any] = (
        {"ProvisionedThroughput": {"ReadCapacityUnits": 5, "WriteCapacityUnits": 5}} if provisioned
        else {"BillingMode": "PAY_PER_REQUEST"})
    raw.create_table(TableName=name, KeySchema=[{"AttributeName": "taskId", "KeyType": "HASH"}],
                     AttributeDefinitions=[{"AttributeName": "taskId", "AttributeType": "S"}], **billing)


def record_calls(client: Any) -> list[str]:
    calls: list[str] = []
    client.meta.events.register("before-call.dynamodb.*", lambda model, **_: calls.append(model.name))
    return calls


@pytest.mark.parametrize("provisioned", [False, True])
def test_a_table_made_by_hand_works_and_ensure_adds_indexes_and_ttl(raw: Any, table_name: str,
                                                                    provisioned: bool) -> None:
    create_by_hand(raw, table_name, provisioned=provisioned)
    with DynamoTaskStore(table=table_name) as store:
        store.create(make_task("old"))
        assert store.get("old") == make_task("old")
        assert store.transition("old", expected={Q}, to=R, changes={"attempts": 1}).status == R
        with pytest.raises(ConfigError, match="sdasync aws bootstrap"):
            store.list()

        store.ensure()

        table = raw.describe_table(TableName=table_name)["Table"]
        indexes = {index["IndexName"]: index for index in table["GlobalSecondaryIndexes"]}
        assert {name: [key["AttributeName"] for key in index["KeySchema"]] for name, index in indexes.items()} == {
            "byCreated": ["listAll", "listKey"], "byStatus": ["status", "listKey"],
            "byUpdated": ["status", "updatedAt"], "byTenant": ["tenant", "listKey"],
            "byTenantStatus": ["tenantStatus", "listKey"], "byOutboxDue": ["outboxPart", "outboxDue"]}
        assert {name: index["Projection"]["ProjectionType"] for name, index in indexes.items()} == {
            "byCreated": "ALL", "byStatus": "ALL", "byUpdated": "KEYS_ONLY", "byTenant": "ALL",
            "byTenantStatus": "ALL", "byOutboxDue": "KEYS_ONLY"}
        assert all(index["IndexStatus"] == "ACTIVE" for index in indexes.values())
        ttl = raw.describe_time_to_live(TableName=table_name)["TimeToLiveDescription"]
        assert (ttl["TimeToLiveStatus"], ttl["AttributeName"]) == ("ENABLED", "expiresAt")
        # The task written before the indexes existed is listed: its item already carried their keys.
        store.create(make_task("new", created_at=1_700_000_001.0))
        assert [t.task_id for t in store.list().tasks] == ["new", "old"]
        assert [t.task_id for t in store.list(status=R).tasks] == ["old"]


def test_ensure_creates_the_table_and_a_second_call_only_reads(raw: Any, table_name: str) -> None:
    with DynamoTaskStore(table=table_name) as store:
        store.ensure()
        table = raw.describe_table(TableName=table_name)["Table"]
        assert table["TableStatus"] == "ACTIVE"
        assert table["BillingModeSummary"]["BillingMode"] == "PAY_PER_REQUEST"
        assert table["KeySchema"] == [{"AttributeName": "taskId", "KeyType": "HASH"}]
        assert {index["IndexName"] for index in table["GlobalSecondaryIndexes"]} == {
            "byCreated", "byStatus", "byUpdated", "byTenant", "byTenantStatus", "byOutboxDue"}

        calls = record_calls(store.client)
        store.ensure()

        assert calls and all(call.startswith("Describe") for call in calls), calls
        assert raw.describe_table(TableName=table_name)["Table"] == table


def test_items_are_plain_attributes(raw: Any, table_name: str) -> None:
    clock = Clock(1_700_000_050.0)
    with DynamoTaskStore(table=table_name, retention_days=2, clock=clock) as store:
        store.ensure()
        task = make_task("plain", info={"seed": 4294967295})
        store.create(task)

        item = raw.get_item(TableName=table_name, Key={"taskId": {"S": "plain"}}, ConsistentRead=True)["Item"]
        assert item["payload"] == {"M": {"prompt": {"S": "a cat"}, "steps": {"N": "20"}, "cfg_scale": {"N": "7.5"}}}
        assert item["info"] == {"M": {"seed": {"N": "4294967295"}}}
        assert (item["status"], item["api"]) == ({"S": "queued"}, {"S": "/sdapi/v1/txt2img"})
        assert (item["attempts"], item["images"]) == ({"N": "0"}, {"L": []})
        assert Decimal(item["createdAt"]["N"]) == 1_700_000_000  # AWS normalises the text of numbers, moto not
        assert item["expiresAt"] == {"N": str(math.ceil(task.created_at + 2 * DAY))}
        assert "error" not in item and "worker" not in item

        # Retention restarts when the task ends, so a finished task is kept for the whole period.
        store.transition("plain", expected={Q}, to=R, changes={"worker": "w1", "progress": {"fraction": 0.5}})
        assert "expiresAt" in raw.get_item(TableName=table_name, Key={"taskId": {"S": "plain"}})["Item"]
        clock.now = 1_700_000_100.25
        store.transition("plain", expected={R}, to=TaskStatus.FAILED,
                         changes={"error": TaskError("engine_timeout", "slow"), "progress": None})
        item = raw.get_item(TableName=table_name, Key={"taskId": {"S": "plain"}}, ConsistentRead=True)["Item"]
        assert item["expiresAt"] == {"N": str(math.ceil(clock.now + 2 * DAY))}
        assert Decimal(item["updatedAt"]["N"]) == Decimal("1700000100.25")
        assert item["error"] == {"M": {"code": {"S": "engine_timeout"}, "message": {"S": "slow"}}}
        assert "progress" not in item  # None removes the attribute
        assert item["worker"] == {"S": "w1"}


def test_conflicts_and_missing_tasks(aws_endpoint: str, table_name: str) -> None:
    with DynamoTaskStore(table=table_name) as store:
        store.ensure()
        store.create(make_task("t1"))

        with pytest.raises(TaskConflict) as caught:
            store.create(make_task("t1", created_at=5.0))
        assert caught.value.current == make_task("t1")
        with pytest.raises(TaskNotFound):
            store.transition("nope", expected={Q}, to=R)
        with pytest.raises(TaskNotFound):
            store.get("nope")


def test_a_cursor_belongs_to_its_status_filter(aws_endpoint: str, table_name: str) -> None:
    with DynamoTaskStore(table=table_name) as store:
        store.ensure()
        for i in range(3):
            store.create(make_task(f"t{i}", created_at=1_700_000_000.0 + i))
        cursor = store.list(status=Q, limit=1).next_cursor
        assert cursor is not None

        assert [t.task_id for t in store.list(status=Q, limit=5, cursor=cursor).tasks] == ["t1", "t0"]
        with pytest.raises(RequestError) as caught:
            store.list(limit=1, cursor=cursor)
        assert caught.value.field == "cursor"
        # The last page has no cursor, even when it is exactly full.
        assert store.list(limit=3).next_cursor is None


def test_an_oversized_task_is_refused_not_retried(aws_endpoint: str, table_name: str) -> None:
    with DynamoTaskStore(table=table_name) as store:
        store.ensure()
        with pytest.raises(BackendRefused, match="400 KB"):
            store.create(Task(task_id="huge", api=Api.IMG2IMG, payload={"init_images": ["A" * 500_000]}))
        with pytest.raises(BackendRefused, match="cannot store"):
            store.create(Task(task_id="nan", api=Api.TXT2IMG, payload={"cfg_scale": math.nan}))
        with pytest.raises(TaskNotFound):
            store.get("huge")


def test_a_missing_table_is_a_config_error(aws_endpoint: str, table_name: str) -> None:
    with DynamoTaskStore(table=table_name) as store, pytest.raises(ConfigError, match="ResourceNotFound"):
        store.get("x")


def test_a_given_client_is_used_and_left_open(raw: Any, table_name: str) -> None:
    with DynamoTaskStore(table=table_name, client=raw) as store:
        assert store.client is raw
        store.ensure()
    assert raw.describe_table(TableName=table_name)["Table"]["TableStatus"] == "ACTIVE"  # still usable


def test_lease_and_history_are_plain_attributes(raw: Any, table_name: str) -> None:
    clock = Clock(1_700_000_050.0)
    record = {"attempt": 1, "worker": "w1", "started_at": 1_700_000_000.5, "ended_at": 1_700_000_050.25,
              "outcome": "retried", "error": {"code": "engine_unavailable", "message": "down"}}
    with DynamoTaskStore(table=table_name, clock=clock) as store:
        store.ensure()
        store.create(make_task("leased"))
        store.transition("leased", expected={Q}, to=R, changes={"attempts": 1, "lease_until": 1_700_000_110.5})

        item = raw.get_item(TableName=table_name, Key={"taskId": {"S": "leased"}}, ConsistentRead=True)["Item"]
        assert Decimal(item["leaseUntil"]["N"]) == Decimal("1700000110.5")
        assert item["history"] == {"L": []}

        store.transition("leased", expected={R}, to=Q, attempt=1, changes={"lease_until": None, "history": [record]})
        item = raw.get_item(TableName=table_name, Key={"taskId": {"S": "leased"}}, ConsistentRead=True)["Item"]
        assert "leaseUntil" not in item  # None removes it: attribute_not_exists is what the claim condition tests
        assert item["history"]["L"][0]["M"]["outcome"] == {"S": "retried"}
        assert item["history"]["L"][0]["M"]["error"] == {
            "M": {"code": {"S": "engine_unavailable"}, "message": {"S": "down"}}}
        assert store.get("leased").history == (AttemptRecord.from_dict(record),)


def test_an_item_written_before_leases_reads_back_and_can_be_claimed(raw: Any, table_name: str) -> None:
    with DynamoTaskStore(table=table_name) as store:
        store.ensure()
        # As an older version wrote it: neither leaseUntil nor history.
        raw.put_item(TableName=table_name, Item={
            "taskId": {"S": "old"}, "api": {"S": "/sdapi/v1/txt2img"}, "status": {"S": "running"},
            "payload": {"M": {}}, "createdAt": {"N": "1700000000"}, "updatedAt": {"N": "1700000000"},
            "attempts": {"N": "1"}, "images": {"L": []}, "extra": {"M": {}}, "listAll": {"S": "tasks"},
            "listKey": {"S": "0001700000000.000000#old"}})

        old = store.get("old")
        assert (old.status, old.attempts, old.lease_until, old.history) == (R, 1, None, ())
        taken = store.transition("old", expected={Q, R}, to=R, attempt=1, changes={"attempts": 2},
                                 lease_expired_before=1_700_000_000.0)
        assert (taken.attempts, taken.history) == (2, ())


def test_a_redrive_restarts_the_retention(raw: Any, table_name: str) -> None:
    clock = Clock(1_700_000_000.0)
    with DynamoTaskStore(table=table_name, retention_days=2, clock=clock) as store:
        store.ensure()
        store.create(make_task("dead", status=TaskStatus.FAILED))
        clock.now += 1.5 * DAY  # the task sat in the dead-letter queue, close to its expiry

        store.transition("dead", expected={TaskStatus.FAILED}, to=Q, changes={"error": None})

        item = raw.get_item(TableName=table_name, Key={"taskId": {"S": "dead"}}, ConsistentRead=True)["Item"]
        assert item["expiresAt"] == {"N": str(math.ceil(clock.now + 2 * DAY))}


def create_like_an_older_bootstrap(raw: Any, name: str) -> None:
    """The table as ``ensure()`` made it before ``byUpdated`` existed: the two listing indexes only."""
    def index(name: str, partition: str) -> dict[str, Any]:
        return {"IndexName": name, "Projection": {"ProjectionType": "ALL"},
                "KeySchema": [{"AttributeName": partition, "KeyType": "HASH"},
                              {"AttributeName": "listKey", "KeyType": "RANGE"}]}

    raw.create_table(TableName=name, BillingMode="PAY_PER_REQUEST",
                     KeySchema=[{"AttributeName": "taskId", "KeyType": "HASH"}],
                     AttributeDefinitions=[{"AttributeName": a, "AttributeType": "S"}
                                           for a in ("taskId", "listAll", "listKey", "status")],
                     GlobalSecondaryIndexes=[index("byCreated", "listAll"), index("byStatus", "status")])


def test_ensure_adds_the_stale_index_to_a_table_of_an_older_version(raw: Any, table_name: str) -> None:
    create_like_an_older_bootstrap(raw, table_name)
    with DynamoTaskStore(table=table_name) as store:
        store.create(make_task("old", created_at=1_600_000_000.0))
        with pytest.raises(ConfigError, match=r"byUpdated.*sdasync aws bootstrap"):
            store.stale(status=Q, updated_before=1_700_000_000.0)

        store.ensure()

        table = raw.describe_table(TableName=table_name)["Table"]
        indexes = {index["IndexName"]: index for index in table["GlobalSecondaryIndexes"]}
        assert [key["AttributeName"] for key in indexes["byUpdated"]["KeySchema"]] == ["status", "updatedAt"]
        assert indexes["byUpdated"]["Projection"]["ProjectionType"] == "KEYS_ONLY"
        # The task written before the index existed is found: its item already carried the keys.
        assert [t.task_id for t in store.stale(status=Q, updated_before=1_700_000_000.0)] == ["old"]
        calls = record_calls(store.client)
        store.ensure()
        assert calls and all(call.startswith("Describe") for call in calls), calls


def test_worker_records_are_items_no_task_read_can_reach(raw: Any, table_name: str) -> None:
    from sdasync.models import EngineHealth, WorkerRecord

    record = WorkerRecord(worker_id="gpu-1:42", engine="fake://", health=EngineHealth(ok=True, extra={"gb": 8.0}),
                          task_id="t1", started_at=1_700_000_000.0, heartbeat_at=1_700_000_010.0,
                          expires_at=1_700_000_025.5, host="gpu-1", pid=42)
    with DynamoTaskStore(table=table_name) as store:
        store.ensure()
        store.put_worker(record)

        item = raw.get_item(TableName=table_name, Key={"taskId": {"S": "worker#gpu-1:42"}}, ConsistentRead=True)["Item"]
        assert (item["listAll"], item["listKey"], item["currentTask"]) == (
            {"S": "workers"}, {"S": "gpu-1:42"}, {"S": "t1"})
        assert "status" not in item and "updatedAt" not in item  # so neither byStatus nor byUpdated holds it
        assert item["expiresAt"] == {"N": "1700000026"}  # the TTL, in whole seconds, never early
        assert store.workers(now=1_700_000_020.0) == [record]
        for read in (lambda: store.get("worker#gpu-1:42"),
                     lambda: store.transition("worker#gpu-1:42", expected={Q}, to=R)):
            with pytest.raises(TaskNotFound):
                read()
        with pytest.raises(BackendRefused, match="reserved"):
            store.create(make_task("worker#gpu-1:42"))
        store.delete("worker#gpu-1:42")  # a task delete never removes a registry record
        assert store.workers(now=1_700_000_020.0) == [record]


def test_integral_floats_get_a_sidecar_attribute(raw: Any, table_name: str) -> None:
    with DynamoTaskStore(table=table_name) as store:
        store.ensure()
        store.create(make_task("floats", info={"cfg_scale": 7.0}))
        store.transition("floats", expected={Q}, to=R, changes={"progress": {"fraction": 1.0, "step": 2, "steps": 2}})

        item = raw.get_item(TableName=table_name, Key={"taskId": {"S": "floats"}}, ConsistentRead=True)["Item"]
        assert item["infoFloats"] == {"L": [{"L": [{"S": "cfg_scale"}]}]}
        assert "payloadFloats" not in item  # 7.5 and 20 need none
        assert {"L": [{"S": "fraction"}]} in item["progressFloats"]["L"]
        assert type(store.get("floats").info["cfg_scale"]) is float  # type: ignore[index]

        store.transition("floats", expected={R}, to=R, changes={"progress": None, "info": {"cfg_scale": 7}})
        item = raw.get_item(TableName=table_name, Key={"taskId": {"S": "floats"}}, ConsistentRead=True)["Item"]
        assert not {"progress", "progressFloats", "infoFloats"} & set(item)
        assert type(store.get("floats").info["cfg_scale"]) is int  # type: ignore[index]


# Issue 9: records, tenants and outboxes in the same table --------------------------------------------------------

def raw_item(raw: Any, table: str, key: str) -> dict[str, Any]:
    item: dict[str, Any] = raw.get_item(TableName=table, Key={"taskId": {"S": key}}, ConsistentRead=True).get(
        "Item", {})
    return item


def test_records_are_items_no_task_read_can_reach(raw: Any, table_name: str) -> None:
    from sdasync.backends.records import Record

    clock = Clock()
    with DynamoTaskStore(table=table_name, clock=clock) as store:
        store.ensure()
        store.put_record("apikey", "acme#k1", {"tenant": "acme", "rate": 2.0}, version=None,
                         expires_at=clock.now + 60.5)
        store.create(make_task("t1"))

        item = raw_item(raw, table_name, "rec#apikey#acme#k1")
        assert (item["listAll"], item["listKey"], item["version"]) == (
            {"S": "rec#apikey"}, {"S": "acme#k1"}, {"N": "1"})
        assert item["data"] == {"S": '{"tenant":"acme","rate":2.0}'}  # one JSON string: 2.0 stays a float
        assert Decimal(item["expiresAt"]["N"]) == Decimal("1700000060.5")
        assert not {"status", "tenant", "tenantStatus", "outboxPart", "updatedAt"} & set(item)
        for read in (lambda: store.get("rec#apikey#acme#k1"),
                     lambda: store.transition("rec#apikey#acme#k1", expected={Q}, to=R),
                     lambda: store.update_outbox("rec#apikey#acme#k1", OUTBOX, expected=OUTBOX)):
            with pytest.raises(TaskNotFound):
                read()
        with pytest.raises(BackendRefused, match="reserved"):
            store.create(make_task("rec#apikey#acme#k1"))
        assert not store.delete("rec#apikey#acme#k1")
        assert [t.task_id for t in store.list().tasks] == ["t1"]
        assert [t.task_id for t in store.list(tenant="").tasks] == ["t1"]
        assert store.get_record("apikey", "acme#k1") == Record(
            kind="apikey", key="acme#k1", data={"tenant": "acme", "rate": 2.0}, expires_at=1_700_000_060.5)


def test_an_expired_record_that_ttl_has_not_deleted_yet_is_absent_and_can_be_created(raw: Any,
                                                                                     table_name: str) -> None:
    clock = Clock()
    with DynamoTaskStore(table=table_name, clock=clock) as store:
        store.ensure()
        store.put_record("idem", "a", {"task": "t1"}, version=None, expires_at=clock.now + 10)
        store.put_record("idem", "b", {"task": "t2"}, version=None)
        clock.now += 10  # expiring now is expired; DynamoDB's TTL has not deleted the item (moto never does)

        assert "Item" in raw.get_item(TableName=table_name, Key={"taskId": {"S": "rec#idem#a"}})
        assert store.get_record("idem", "a") is None
        assert [r.key for r in store.list_records("idem").records] == ["b"]
        assert not store.delete_record("idem", "a")
        with pytest.raises(RecordConflict) as caught:
            store.put_record("idem", "a", {"task": "t3"}, version=1)  # a replace needs a live record
        assert caught.value.current is None
        again = store.put_record("idem", "a", {"task": "t3"}, version=None)
        assert (again.version, again.expires_at) == (1, None)
        assert "expiresAt" not in raw_item(raw, table_name, "rec#idem#a")  # kept until deleted now


def test_tenant_attributes_follow_every_transition(raw: Any, table_name: str) -> None:
    with DynamoTaskStore(table=table_name) as store:
        store.ensure()
        store.create(make_task("a1", tenant="acme"))
        store.create(make_task("n1"))
        assert (raw_item(raw, table_name, "a1")["tenant"], raw_item(raw, table_name, "a1")["tenantStatus"]) == (
            {"S": "acme"}, {"S": "acme#queued"})
        # Tenant "" has a token, since an index key cannot be empty: its tasks can be listed too.
        assert (raw_item(raw, table_name, "n1")["tenant"], raw_item(raw, table_name, "n1")["tenantStatus"]) == (
            {"S": "-"}, {"S": "-#queued"})

        store.transition("a1", expected={Q}, to=R, changes={"attempts": 1})
        assert raw_item(raw, table_name, "a1")["tenantStatus"] == {"S": "acme#running"}
        assert [t.task_id for t in store.list(tenant="acme", status=R).tasks] == ["a1"]
        assert store.list(tenant="acme", status=Q).tasks == []
        assert [t.task_id for t in store.list(tenant="").tasks] == ["n1"]
        with pytest.raises(BackendRefused, match="invalid tenant"):
            store.create(make_task("bad", tenant="-"))  # would pass for tenant ""


def test_a_task_of_an_older_version_joins_tenant_listings_at_its_next_transition(raw: Any, table_name: str) -> None:
    with DynamoTaskStore(table=table_name) as store:
        store.ensure()
        item = task_item("old")
        raw.put_item(TableName=table_name, Item=item)  # as written before tenants: neither tenant nor tenantStatus
        assert store.get("old").tenant == ""
        assert store.list(tenant="").tasks == []

        with DynamoTaskStore(table=table_name) as fresh:  # knows nothing of the task: reads its tenant first
            calls = record_calls(fresh.client)
            fresh.transition("old", expected={Q}, to=R, changes={"attempts": 1})
            assert calls == ["GetItem", "UpdateItem"]
            calls.clear()
            fresh.transition("old", expected={R}, to=R, attempt=1, changes={"progress": {"fraction": 0.5}})
            assert calls == ["UpdateItem"]  # then remembered: one write per transition, as before

        assert (raw_item(raw, table_name, "old")["tenant"], raw_item(raw, table_name, "old")["tenantStatus"]) == (
            {"S": "-"}, {"S": "-#running"})
        assert [t.task_id for t in store.list(tenant="", status=R).tasks] == ["old"]


def test_a_transition_with_a_stale_tenant_in_memory_writes_the_tenant_the_item_has(raw: Any,
                                                                                   table_name: str) -> None:
    with DynamoTaskStore(table=table_name) as store, DynamoTaskStore(table=table_name) as other:
        store.ensure()
        store.create(make_task("reused", tenant="acme"))
        other.delete("reused")
        other.create(make_task("reused", tenant="zeta"))  # the same id, another tenant, behind store's back

        moved = store.transition("reused", expected={Q}, to=R, changes={"attempts": 1})

        assert moved.tenant == "zeta"
        assert raw_item(raw, table_name, "reused")["tenantStatus"] == {"S": "zeta#running"}
        assert [t.task_id for t in store.list(tenant="zeta", status=R).tasks] == ["reused"]
        assert store.list(tenant="acme").tasks == []
        with pytest.raises(TaskConflict) as caught:  # a real conflict is still one, after the retry
            store.transition("reused", expected={Q}, to=R)
        assert caught.value.current == moved


def test_the_outbox_is_a_map_and_the_due_index_follows_its_due_time(raw: Any, table_name: str) -> None:
    from dataclasses import replace

    from sdasync.outbox import DeliveryAttempt, OutboxState

    with DynamoTaskStore(table=table_name) as store:
        store.ensure()
        store.create(make_task("hooked", status=R, attempts=1))
        done = store.transition("hooked", expected={R}, to=S, changes={"outbox": OUTBOX})

        item = raw_item(raw, table_name, "hooked")
        assert (item["outboxPart"], Decimal(item["outboxDue"]["N"])) == ({"S": "due"}, Decimal("1700000010"))
        assert item["outbox"]["M"]["event_id"] == {"S": OUTBOX.event_id}
        assert store.get("hooked").outbox == OUTBOX  # integral floats read back as floats, without a sidecar
        assert [t.task_id for t in store.due_outbox(before=1_700_000_010.5)] == ["hooked"]

        tried = OUTBOX.tried(DeliveryAttempt(at=1_700_000_011.0, status=500, error="HTTP 500"),
                             due_at=1_700_000_020.0, state=OutboxState.PENDING)
        calls = record_calls(store.client)
        later = store.update_outbox("hooked", tried, expected=OUTBOX)
        assert calls == ["UpdateItem"]
        assert later.outbox == replace(tried, version=1)
        assert (later.status, later.updated_at) == (done.status, done.updated_at)
        assert Decimal(raw_item(raw, table_name, "hooked")["outboxDue"]["N"]) == Decimal("1700000020")
        assert store.due_outbox(before=1_700_000_010.5) == []

        delivered = later.outbox.tried(DeliveryAttempt(at=1_700_000_021.0, status=200), due_at=None,
                                       state=OutboxState.DELIVERED)
        store.update_outbox("hooked", delivered, expected=later.outbox)
        assert not {"outboxPart", "outboxDue"} & set(raw_item(raw, table_name, "hooked"))
        with pytest.raises(TaskConflict) as caught:
            store.update_outbox("hooked", delivered, expected=later.outbox)  # version 1 is gone
        assert caught.value.current is not None and caught.value.current.outbox == replace(delivered, version=2)
        with pytest.raises(TaskNotFound):
            store.update_outbox("nope", delivered, expected=later.outbox)


def test_ensure_adds_the_tenant_and_outbox_indexes_to_a_table_of_an_older_version(raw: Any,
                                                                                 table_name: str) -> None:
    create_like_an_older_bootstrap(raw, table_name)
    with DynamoTaskStore(table=table_name) as store:
        store.ensure()  # adds byUpdated, then the three of issue 9, one UpdateTable each
        store.create(make_task("t1", tenant="acme"))

        table = raw.describe_table(TableName=table_name)["Table"]
        assert {i["IndexName"] for i in table["GlobalSecondaryIndexes"]} >= {"byTenant", "byTenantStatus",
                                                                            "byOutboxDue"}
        assert {d["AttributeName"]: d["AttributeType"] for d in table["AttributeDefinitions"]} == {
            "taskId": "S", "listAll": "S", "listKey": "S", "status": "S", "updatedAt": "N", "tenant": "S",
            "tenantStatus": "S", "outboxPart": "S", "outboxDue": "N"}
        assert [t.task_id for t in store.list(tenant="acme").tasks] == ["t1"]
        calls = record_calls(store.client)
        store.ensure()
        assert calls and all(call.startswith("Describe") for call in calls), calls


def task_item(task_id: str) -> dict[str, Any]:
    return {"taskId": {"S": task_id}, "api": {"S": "/sdapi/v1/txt2img"}, "status": {"S": "queued"},
            "payload": {"M": {}}, "createdAt": {"N": "1700000000"}, "updatedAt": {"N": "1700000000"},
            "attempts": {"N": "0"}, "images": {"L": []}, "extra": {"M": {}}, "listAll": {"S": "tasks"},
            "listKey": {"S": f"0001700000000.000000#{task_id}"}}
