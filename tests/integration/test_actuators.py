"""The fleet actuators against real things: "spotfleet" and "asg" against moto_server (the capacity really
changes), "local" with real ``sdasync worker`` processes."""

from __future__ import annotations

import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import wait_until
from sdasync.backends.registry import open_backend
from sdasync.errors import ConfigError
from sdasync.scaler.actuators.base import Fleet


def make_spot_fleet(target: int = 0) -> tuple[Any, str]:
    from sdasync.awsclient import aws_client

    ec2 = aws_client("ec2")
    image = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    request = ec2.request_spot_fleet(SpotFleetRequestConfig={
        "TargetCapacity": target, "IamFleetRole": "arn:aws:iam::123456789012:role/fleet",
        "AllocationStrategy": "lowestPrice",
        "LaunchSpecifications": [{"ImageId": image, "InstanceType": "t3.micro", "WeightedCapacity": 1.0}],
    })
    return ec2, request["SpotFleetRequestId"]


@pytest.fixture
def spot_fleet(aws_endpoint: str) -> Iterator[str]:
    ec2, request_id = make_spot_fleet()
    try:
        yield request_id
    finally:
        # moto refuses TerminateInstances=True on a fleet with no instances; stop them separately.
        instances = [i["InstanceId"] for i in
                     ec2.describe_spot_fleet_instances(SpotFleetRequestId=request_id)["ActiveInstances"]]
        ec2.cancel_spot_fleet_requests(SpotFleetRequestIds=[request_id], TerminateInstances=False)
        if instances:
            ec2.terminate_instances(InstanceIds=instances)
        ec2.close()


def make_group(max_size: int = 10) -> tuple[Any, str]:
    from sdasync.awsclient import aws_client

    ec2 = aws_client("ec2")
    image = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    name = f"sdasync-test-{uuid.uuid4().hex[:8]}"
    ec2.create_launch_template(LaunchTemplateName=name,
                               LaunchTemplateData={"ImageId": image, "InstanceType": "t3.micro"})
    ec2.close()
    autoscaling = aws_client("autoscaling")
    autoscaling.create_auto_scaling_group(
        AutoScalingGroupName=name, LaunchTemplate={"LaunchTemplateName": name, "Version": "$Latest"},
        MinSize=0, MaxSize=max_size, DesiredCapacity=0, AvailabilityZones=["us-east-1a"])
    return autoscaling, name


@pytest.fixture
def group(aws_endpoint: str) -> Iterator[str]:
    autoscaling, name = make_group()
    try:
        yield name
    finally:
        autoscaling.delete_auto_scaling_group(AutoScalingGroupName=name, ForceDelete=True)
        autoscaling.close()


def test_spotfleet_target_capacity_follows_set_desired(spot_fleet: str) -> None:
    with open_backend("fleet", f"spotfleet://{spot_fleet}") as fleet:
        assert isinstance(fleet, Fleet)
        assert fleet.capacity() == (0, 0)
        fleet.set_desired(3)
        assert fleet.target() == 3
        running, pending = fleet.capacity()
        assert running + pending == 3
        fleet.set_desired(3)  # unchanged: no second modify (a fleet still "modifying" would refuse it)
        fleet.set_desired(1)
        assert fleet.target() == 1


def test_spotfleet_unknown_request_is_a_config_error(aws_endpoint: str) -> None:
    with open_backend("fleet", "spotfleet://sfr-00000000-0000-0000-0000-000000000000") as fleet, \
            pytest.raises(ConfigError):
        fleet.capacity()


def test_asg_desired_capacity_follows_set_desired(group: str) -> None:
    with open_backend("fleet", f"asg://{group}") as fleet:
        assert isinstance(fleet, Fleet)
        assert fleet.capacity() == (0, 0)
        fleet.set_desired(4)
        assert fleet.describe()["DesiredCapacity"] == 4
        running, pending = fleet.capacity()
        assert running + pending == 4
        fleet.set_desired(50)  # beyond MaxSize 10: clamped, not refused
        assert fleet.describe()["DesiredCapacity"] == 10
        fleet.set_desired(0)
        assert fleet.describe()["DesiredCapacity"] == 0


def test_asg_scale_in_spares_the_instance_a_busy_worker_protected(group: str) -> None:
    from sdasync.scaler.actuators.asg import InstanceProtection

    with open_backend("fleet", f"asg://{group}") as fleet:
        fleet.set_desired(2)
        instances = [i["InstanceId"] for i in fleet.describe()["Instances"]]
        assert len(instances) == 2
        busy = InstanceProtection(group, instances[1])
        busy.busy(True)
        fleet.set_desired(1)
        left = [i["InstanceId"] for i in fleet.describe()["Instances"]]
        assert left == [instances[1]], "scale-in took the busy instance"
        busy.close()  # idle again: unprotected
        assert fleet.describe()["Instances"][0]["ProtectedFromScaleIn"] is False


def test_unknown_fleet_scheme_and_parameter_fail_fast() -> None:
    with pytest.raises(ConfigError, match="asg://, local://, spotfleet://"):
        open_backend("fleet", "ecs://cluster")
    with pytest.raises(ConfigError, match="valid: max"):
        open_backend("fleet", "local://?min=1")


def handles_sigterm(pid: int) -> bool:
    """Whether the process has installed its SIGTERM handler (Linux: the SigCgt mask in /proc): before that,
    a SIGTERM kills a worker that is still importing, which is harmless but not the drain under test."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
    return bool(caught & (1 << (signal.SIGTERM - 1)))


@pytest.mark.slow
def test_local_fleet_starts_and_drains_worker_processes(tmp_path: Path) -> None:
    data = tmp_path / "data"
    worker_args = ["--data-dir", str(data), "--engine", "fake://?seconds=0.05", "--log-level", "WARNING"]
    with open_backend("fleet", "local://?max=2", worker_args=worker_args) as fleet:
        fleet.set_desired(5)  # clamped to max=2
        wait_until(lambda: fleet.capacity() == (2, 0), timeout=20, message="two workers never started")
        processes = list(fleet.supervisor.processes)
        wait_until(lambda: all(handles_sigterm(p.pid) for p in processes), timeout=20)
        fleet.set_desired(1)
        assert fleet.capacity() == (1, 0)
        # The newest got one SIGTERM and drains: it exits 0 and is not restarted.
        assert processes[1].wait(timeout=20) == 0
        wait_until(lambda: fleet.supervisor.draining_count() == 0, timeout=5)
        assert fleet.supervisor.health()["running"] == 1
        fleet.set_desired(0)
        assert processes[0].wait(timeout=20) == 0
        assert fleet.capacity() == (0, 0)
    assert all(p.poll() is not None for p in processes)


def test_lambda_handler_makes_one_decision_from_environment(group: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from sdasync.backends.aws.sqs import SqsQueue
    from sdasync.scaler import lambda_handler

    queue_url = f"sqs://sdasync-lambda-{uuid.uuid4().hex[:8]}"
    with SqsQueue.from_url(queue_url) as queue:
        queue.ensure()
        for i in range(7):
            queue.send(f"task-{i}")
    monkeypatch.setenv("SDASYNC_QUEUE", queue_url)
    monkeypatch.setenv("SDASYNC_FLEET", f"asg://{group}")
    monkeypatch.setenv("SDASYNC_BACKLOG_PER_WORKER", "3")
    monkeypatch.setattr(lambda_handler, "_loop", None)
    answer = lambda_handler.handler({}, None)
    assert answer["desired"] == 3 and answer["visible"] == 7
    with open_backend("fleet", f"asg://{group}") as fleet:
        assert fleet.describe()["DesiredCapacity"] == 3
