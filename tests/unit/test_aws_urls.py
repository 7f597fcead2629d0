"""``sqs://`` and ``s3://`` URL parsing: names, the queue-URL form, parameters and their errors. No network: the
modules must not even build a client while parsing."""

from __future__ import annotations

from typing import Any

import pytest

from sdasync.backends.aws import s3 as s3_module
from sdasync.backends.aws import sqs as sqs_module
from sdasync.backends.aws.s3 import S3BlobStore
from sdasync.backends.aws.sqs import SqsQueue
from sdasync.backends.keys import check_key
from sdasync.backends.registry import resolve
from sdasync.errors import ConfigError, RequestError


@pytest.fixture(autouse=True)
def no_clients(monkeypatch: pytest.MonkeyPatch) -> None:
    """Parsing builds no AWS client; any attempt fails the test."""
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("from_url built an AWS client")

    monkeypatch.setattr(sqs_module, "aws_client", refuse)
    monkeypatch.setattr(s3_module, "aws_client", refuse)


def test_the_registry_maps_the_schemes_to_these_classes() -> None:
    assert resolve("queue", "sqs://tasks") is SqsQueue
    assert resolve("blobs", "s3://bucket") is S3BlobStore


# sqs:// ----------------------------------------------------------------------------------------------------------


def test_sqs_queue_by_name_with_defaults() -> None:
    queue = SqsQueue.from_url("sqs://sd-tasks")

    assert (queue.name, queue.queue_url, queue.region) == ("sd-tasks", None, None)
    assert (queue.max_receives, queue.visibility_timeout, queue.wait_s) == (10, 30, 20)
    assert queue.capabilities == frozenset({"dead_letter", "delay", "redrive", "long_poll", "batch"})


def test_sqs_queue_names_keep_their_case() -> None:
    assert SqsQueue.from_url("sqs://SD_Tasks-1").name == "SD_Tasks-1"


def test_sqs_queue_by_url_takes_region_from_the_host() -> None:
    queue = SqsQueue.from_url("sqs://sqs.eu-west-1.amazonaws.com/123456789012/sd-tasks")

    assert queue.name == "sd-tasks"
    assert queue.queue_url == "https://sqs.eu-west-1.amazonaws.com/123456789012/sd-tasks"
    assert queue.region == "eu-west-1"


def test_sqs_region_parameter_wins_over_the_host() -> None:
    queue = SqsQueue.from_url("sqs://sqs.eu-west-1.amazonaws.com/123456789012/sd-tasks?region=us-east-2")

    assert queue.region == "us-east-2"


def test_sqs_parameters_are_typed() -> None:
    queue = SqsQueue.from_url("sqs://sd-tasks?region=us-west-2&max_receives=3&visibility_timeout=90.5&wait=5")

    assert (queue.region, queue.max_receives, queue.visibility_timeout, queue.wait_s) == ("us-west-2", 3, 90.5, 5)


def test_sqs_keyword_arguments_override_the_url() -> None:
    client = object()
    queue = SqsQueue.from_url("sqs://sd-tasks?wait=5", wait_s=1, client=client)

    assert queue.wait_s == 1
    assert queue._client is client


def test_sqs_fractional_wait_rounds_up_to_whole_seconds() -> None:
    assert SqsQueue.from_url("sqs://sd-tasks?wait=0.5").wait_s == 1
    assert SqsQueue.from_url("sqs://sd-tasks?wait=0").wait_s == 0


def test_sqs_unknown_parameter_lists_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match="valid: max_receives, region, visibility_timeout, wait"):
        SqsQueue.from_url("sqs://sd-tasks?visibility=3")


@pytest.mark.parametrize("url", [
    "sqs://sd-tasks?max_receives=0",
    "sqs://sd-tasks?max_receives=1001",
    "sqs://sd-tasks?max_receives=many",
    "sqs://sd-tasks?visibility_timeout=-1",
    "sqs://sd-tasks?visibility_timeout=43201",
    "sqs://sd-tasks?wait=21",
    "sqs://sd-tasks?wait=-1",
])
def test_sqs_out_of_range_parameters_are_refused(url: str) -> None:
    with pytest.raises(ConfigError):
        SqsQueue.from_url(url)


@pytest.mark.parametrize("url", [
    "sqs://",
    "sqs:///sd-tasks",
    "sqs://sd.tasks",  # dots: not a queue name, and not a queue URL without a path
    "sqs://tasks.fifo",  # FIFO queues are not supported
    "sqs://" + "q" * 77,  # no room left for the "-dlq" suffix within SQS's 80 characters
    "sqs://user@sd-tasks",
    "sqs://sqs.us-east-1.amazonaws.com/sd-tasks",  # the URL form needs /<account>/<name>
    "sqs://sqs.us-east-1.amazonaws.com/123456789012/sd-tasks/extra",
    "dynamodb://sd-tasks",
])
def test_sqs_malformed_urls_are_refused(url: str) -> None:
    with pytest.raises(ConfigError):
        SqsQueue.from_url(url)


# s3:// -----------------------------------------------------------------------------------------------------------


def test_s3_bucket_and_prefix_with_defaults() -> None:
    blobs = S3BlobStore.from_url("s3://sd-results/images/v1/")

    assert (blobs.bucket, blobs.prefix, blobs.region, blobs.cdn, blobs.expires_s) == (
        "sd-results", "images/v1", None, None, 3600)
    assert blobs.capabilities == frozenset({"presigned_url"})
    assert blobs.object_key("task-1/0.png") == "images/v1/task-1/0.png"


def test_s3_without_prefix_keys_are_object_keys() -> None:
    blobs = S3BlobStore.from_url("s3://sd-results")

    assert blobs.prefix == ""
    assert blobs.object_key("task-1/0.png") == "task-1/0.png"


def test_s3_parameters_are_typed_and_cdn_adds_a_capability() -> None:
    blobs = S3BlobStore.from_url("s3://sd-results/out?region=eu-central-1&cdn=https://d111.cloudfront.net/"
                                 "&expires=600")

    assert (blobs.region, blobs.cdn, blobs.expires_s) == ("eu-central-1", "https://d111.cloudfront.net", 600)
    assert blobs.capabilities == frozenset({"presigned_url", "cdn"})


def test_s3_cdn_urls_need_no_client() -> None:
    blobs = S3BlobStore.from_url("s3://sd-results/out?cdn=https://d111.cloudfront.net")

    assert blobs.url("task 1/0.png", base_url="http://ignored") == "https://d111.cloudfront.net/out/task%201/0.png"


def test_s3_unknown_parameter_lists_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match="valid: cdn, expires, region"):
        S3BlobStore.from_url("s3://sd-results?expiry=5")


@pytest.mark.parametrize("url", [
    "s3://",
    "s3:///prefix",
    "s3://ab",
    "s3://" + "b" * 64,
    "s3://Upper-Case",
    "s3://under_score",
    "s3://-leading-hyphen",
    "s3://double..dot",
    "s3://192.168.1.10",
    "s3://sd-results/a/../b",
    "s3://sd-results/a//b",
    "s3://sd-results?expires=0",
    "s3://sd-results?expires=604801",
    "s3://sd-results?expires=soon",
    "s3://sd-results?cdn=ftp://cdn.example.com",
    "s3://sd-results?cdn=d111.cloudfront.net",
    "s3://sd-results?cdn=https://d111.cloudfront.net/?sig=1",
    "file:///sd-results",
])
def test_s3_malformed_urls_are_refused(url: str) -> None:
    with pytest.raises(ConfigError):
        S3BlobStore.from_url(url)


def test_s3_accepts_the_longest_and_shortest_bucket_names() -> None:
    assert S3BlobStore.from_url("s3://abc").bucket == "abc"
    assert S3BlobStore.from_url("s3://" + "b" * 63).bucket == "b" * 63
    assert S3BlobStore.from_url("s3://my.dotted-bucket").bucket == "my.dotted-bucket"


@pytest.mark.parametrize("key", ["../x", "/etc/passwd", "a/../../b", "a\\b", "", "a//b", "a/./b", "..", "a/",
                                 "x\x00y", "//x"])
def test_s3_unsafe_keys_are_refused_before_any_request(key: str) -> None:
    with pytest.raises(RequestError) as caught:
        check_key(key)
    assert caught.value.field == "key"
    blobs = S3BlobStore.from_url("s3://sd-results?cdn=https://d111.cloudfront.net")
    with pytest.raises(RequestError):
        blobs.url(key, base_url="http://ignored")
