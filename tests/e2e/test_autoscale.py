"""Autoscaling as a user runs it: ``sdasync scaler --once`` against AWS (moto_server) fleets, and
``sdasync serve --autoscale`` growing local workers with the queue and going back to zero."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import Processes, wait_healthy
from helpers import wait_until
from sdasync.client import Client

TASKS = 25


def make_spot_fleet() -> tuple[Any, str]:
    """A spot fleet request with target 0 (the same shape tests/integration/test_actuators.py uses)."""
    from sdasync.awsclient import aws_client

    ec2 = aws_client("ec2")
    image = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    request = ec2.request_spot_fleet(SpotFleetRequestConfig={
        "TargetCapacity": 0, "IamFleetRole": "arn:aws:iam::123456789012:role/fleet",
        "AllocationStrategy": "lowestPrice",
        "LaunchSpecifications": [{"ImageId": image, "InstanceType": "t3.micro", "WeightedCapacity": 1.0}]})
    return ec2, request["SpotFleetRequestId"]


def make_group() -> tuple[Any, str]:
    """An Auto Scaling group of 0..10 instances from a launch template."""
    from sdasync.awsclient import aws_client

    name = f"sdasync-e2e-{uuid.uuid4().hex[:8]}"
    ec2 = aws_client("ec2")
    image = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    ec2.create_launch_template(LaunchTemplateName=name,
                               LaunchTemplateData={"ImageId": image, "InstanceType": "t3.micro"})
    ec2.close()
    autoscaling = aws_client("autoscaling")
    autoscaling.create_auto_scaling_group(
        AutoScalingGroupName=name, LaunchTemplate={"LaunchTemplateName": name, "Version": "$Latest"},
        MinSize=0, MaxSize=10, DesiredCapacity=0, AvailabilityZones=["us-east-1a"])
    return autoscaling, name


@pytest.fixture
def queue_with_25_tasks(aws_endpoint: str) -> str:
    from sdasync.backends.aws.sqs import SqsQueue

    url = f"sqs://sdasync-scale-{uuid.uuid4().hex[:8]}"
    with SqsQueue.from_url(url) as queue:
        queue.ensure()
        for i in range(TASKS):
            queue.send(f"task-{i}")
        assert queue.depth().visible == TASKS
    return url


def scaler_once(procs: Processes, queue: str, fleet: str) -> None:
    done = procs.run("scaler", "--once", "--queue", queue, "--fleet", fleet, "--backlog-per-worker", "5",
                     "--max", "10", timeout=60)
    assert done.returncode == 0, done.stderr
    # The decision is logged as one JSON line with its inputs.
    assert '"event":"scale_decision"' in done.stderr and '"visible":25' in done.stderr, done.stderr


def test_scaler_once_sets_spot_fleet_target_capacity(procs: Processes, queue_with_25_tasks: str) -> None:
    ec2, request_id = make_spot_fleet()
    try:
        scaler_once(procs, queue_with_25_tasks, f"spotfleet://{request_id}")
        config = ec2.describe_spot_fleet_requests(SpotFleetRequestIds=[request_id])["SpotFleetRequestConfigs"][0]
        assert config["SpotFleetRequestConfig"]["TargetCapacity"] == 5
    finally:
        ec2.cancel_spot_fleet_requests(SpotFleetRequestIds=[request_id], TerminateInstances=True)
        ec2.close()


def test_scaler_once_sets_asg_desired_capacity(procs: Processes, queue_with_25_tasks: str) -> None:
    autoscaling, name = make_group()
    try:
        scaler_once(procs, queue_with_25_tasks, f"asg://{name}")
        group = autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[name])["AutoScalingGroups"][0]
        assert group["DesiredCapacity"] == 5
    finally:
        autoscaling.delete_auto_scaling_group(AutoScalingGroupName=name, ForceDelete=True)
        autoscaling.close()


@pytest.mark.slow
def test_serve_autoscale_grows_to_max_with_a_backlog_and_back_to_zero(procs: Processes, port: int,
                                                                       tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{port}"
    serve = procs.start("serve", "--autoscale", "--max-workers", "3", "--scale-in-cooldown", "3",
                        "--scale-interval", "0.5", "--engine", "fake://?seconds=1.5", "--port", str(port),
                        "--data-dir", str(tmp_path / "data"), name="serve")
    health = wait_healthy(url, serve, timeout=60)
    assert health["workers"]["running"] == 0, health  # type: ignore[index]

    def workers() -> dict[str, Any]:
        assert serve.poll() is None, procs.log("serve")
        section: dict[str, Any] = httpx.get(f"{url}/healthz", timeout=5).json()["workers"]
        return section

    with Client(url) as client:
        ids = [client.submit({"prompt": f"fox {i}", "steps": 2, "width": 64, "height": 64}) for i in range(12)]
        wait_until(lambda: workers()["running"] == 3, timeout=30, interval=0.05,
                   message=f"never reached 3 workers: {workers()}")
        assert workers()["desired"] == 3
        wait_until(lambda: all(client.get(i)["status"] == "succeeded" for i in ids), timeout=60, interval=0.2,
                   message="the backlog never drained")
    wait_until(lambda: (w := workers())["running"] == 0 and w["desired"] == 0 and w["draining"] == 0,
               timeout=30, interval=0.1, message=f"workers never went back to zero: {workers()}")
