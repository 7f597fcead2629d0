"""Retention on S3 against a moto_server: ``ensure()`` puts one lifecycle rule per prefix, merges it with the
bucket's other rules, changes nothing when run again, and ``sdasync aws bootstrap`` feeds it the one retention."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("boto3")

import boto3

from sdasync.backends.aws.s3 import S3BlobStore
from sdasync.bootstrap import bootstrap


@pytest.fixture
def bucket(aws_endpoint: str) -> str:
    return f"results-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def raw(aws_endpoint: str) -> Iterator[Any]:
    client = boto3.client("s3")
    yield client
    client.close()


def rules(raw: Any, bucket: str) -> dict[str, tuple[str, str, int]]:
    """The bucket's lifecycle rules by ID: (status, prefix, days)."""
    found = raw.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]
    return {rule["ID"]: (rule["Status"], rule.get("Filter", {}).get("Prefix", rule.get("Prefix")),
                         rule["Expiration"]["Days"]) for rule in found}


def record_calls(client: Any) -> list[str]:
    calls: list[str] = []
    client.meta.events.register("before-call.s3.*", lambda model, **_: calls.append(model.name))
    return calls


def test_ensure_expires_the_prefix_after_the_retention_and_says_so(bucket: str, raw: Any) -> None:
    with S3BlobStore(bucket=bucket, prefix="results", retention_days=7.5) as blobs:
        blobs.ensure()

        assert rules(raw, bucket) == {"sdasync-expire:results": ("Enabled", "results/", 8)}  # whole days, rounded up
        assert "expires" in blobs.capabilities
    with S3BlobStore(bucket=bucket, prefix="results") as reopened:  # another process, no retention given
        assert "expires" not in reopened.capabilities  # opening makes no call, so it claims nothing yet
        assert reopened.check_lifecycle() is True
        assert reopened.capabilities == frozenset({"presigned_url", "expires"})
    with S3BlobStore(bucket=bucket, prefix="elsewhere") as other:
        assert other.check_lifecycle() is False  # the rule covers results/ only
        assert "expires" not in other.capabilities
    with S3BlobStore(bucket=bucket, prefix="results", retention_days=30) as other_retention:
        assert other_retention.check_lifecycle() is False  # the rule does not say what this store wants


def test_a_second_ensure_changes_nothing(bucket: str, raw: Any) -> None:
    with S3BlobStore(bucket=bucket, prefix="results", retention_days=30) as blobs:
        blobs.ensure()
        before = rules(raw, bucket)
        calls = record_calls(blobs._s3())

        blobs.ensure()

    assert "PutBucketLifecycleConfiguration" not in calls and "GetBucketLifecycleConfiguration" in calls
    assert rules(raw, bucket) == before


def test_rules_it_did_not_create_are_kept(bucket: str, raw: Any) -> None:
    with S3BlobStore(bucket=bucket, prefix="results") as plain:
        plain.ensure()  # no retention: the bucket only, no rule
    with pytest.raises(raw.exceptions.ClientError, match="NoSuchLifecycleConfiguration"):
        raw.get_bucket_lifecycle_configuration(Bucket=bucket)
    raw.put_bucket_lifecycle_configuration(Bucket=bucket, LifecycleConfiguration={"Rules": [
        {"ID": "operator-logs", "Status": "Enabled", "Filter": {"Prefix": "logs/"}, "Expiration": {"Days": 90}}]})

    with S3BlobStore(bucket=bucket, prefix="results", retention_days=30) as results, \
            S3BlobStore(bucket=bucket, prefix="requests", retention_days=30) as payloads:
        results.ensure()
        payloads.ensure()
    with S3BlobStore(bucket=bucket, prefix="results", retention_days=2) as shorter:
        shorter.ensure()  # a new retention replaces this store's rule, and only it

    assert rules(raw, bucket) == {
        "operator-logs": ("Enabled", "logs/", 90),
        "sdasync-expire:requests": ("Enabled", "requests/", 30),
        "sdasync-expire:results": ("Enabled", "results/", 2),
    }


def test_a_bucket_without_lifecycle_has_no_expires_capability(bucket: str) -> None:
    with S3BlobStore(bucket=bucket, prefix="results") as blobs:
        assert blobs.check_lifecycle() is False  # not even a bucket yet: the check fails, and says no
        blobs.ensure()
        assert blobs.check_lifecycle() is False
        assert "expires" not in blobs.capabilities


def test_bootstrap_gives_the_one_retention_to_the_table_and_both_prefixes(bucket: str, raw: Any) -> None:
    table = f"sd_tasks-{uuid.uuid4().hex[:12]}"

    done = bootstrap({"store": f"dynamodb://{table}", "blobs": f"s3://{bucket}/results",
                      "payloads": f"s3://{bucket}/requests", "queue": None}, retention_days=3)

    assert done == [f"store: dynamodb://{table}", f"blobs: s3://{bucket}/results",
                    f"payloads: s3://{bucket}/requests"]
    assert rules(raw, bucket) == {"sdasync-expire:results": ("Enabled", "results/", 3),
                                  "sdasync-expire:requests": ("Enabled", "requests/", 3)}
    dynamodb = boto3.client("dynamodb")
    try:
        ttl = dynamodb.describe_time_to_live(TableName=table)["TimeToLiveDescription"]
    finally:
        dynamodb.close()
    assert (ttl["TimeToLiveStatus"], ttl["AttributeName"]) == ("ENABLED", "expiresAt")
    assert bootstrap({"blobs": f"s3://{bucket}/results", "payloads": f"s3://{bucket}/requests"},
                     retention_days=3) == [f"blobs: s3://{bucket}/results", f"payloads: s3://{bucket}/requests"]
    assert len(rules(raw, bucket)) == 2


def test_bootstrap_refuses_what_it_cannot_create(tmp_path: Any, aws_endpoint: str) -> None:
    from sdasync.errors import ConfigError

    with pytest.raises(ConfigError, match="no cloud resources"):
        bootstrap({"payloads": f"file:///{tmp_path}/requests"}, retention_days=1)
    with pytest.raises(ConfigError, match="unknown bootstrap role"):
        bootstrap({"images": "s3://b/x"}, retention_days=1)
