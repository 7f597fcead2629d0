"""Workers on an EC2 Auto Scaling group, sized through its desired capacity.

URL: ``asg://<group name>``. Query parameters: ``region``.

- ``capacity()`` reads DescribeAutoScalingGroups: running is the instances ``InService``; pending is those
  ``Pending`` (booting, or held by a launch lifecycle hook) plus what the desired capacity asks for that has no
  instance yet.
- ``set_desired(n)`` calls SetDesiredCapacity(HonorCooldown=False) when the desired capacity differs: the policy
  has its own cooldown, and the group's would silently drop the change. ``n`` is clamped to the group's MinSize
  and MaxSize, which stay the operator's hard limits (SetDesiredCapacity refuses anything outside them).

Scale-in safety: instance scale-in protection, set by the worker while it is busy
---------------------------------------------------------------------------------
When the desired capacity drops, the group terminates instances of its choosing; one running a task loses it
unless something stops that. Two ways were weighed:

1. The worker protects its own instance (SetInstanceProtection) while it has work and unprotects it when a
   receive comes back empty. The group then only picks idle instances; if all are busy the desired capacity
   still drops and the group terminates the extra instances as they turn idle, which is exactly "drain, then
   go". Cost: one AWS call when a worker turns busy and one when it turns idle (not one per task: the state is
   remembered and only changes are sent), the instance id from IMDS, and ``autoscaling:SetInstanceProtection``
   in the instance role.
2. A termination lifecycle hook: the group keeps a chosen instance in ``Terminating:Wait`` until the worker
   notices (polling IMDS ``autoscaling/target-lifecycle-state``), drains and calls CompleteLifecycleAction.
   It chooses busy instances as readily as idle ones, so a busy instance would hand its task back (or hold the
   hook up to its heartbeat timeout) while an idle one stays, and it needs a second watcher, the hook's name
   and a heartbeat for tasks longer than the hook's timeout.

We chose (1): the group never picks a busy instance, so no work is interrupted by scale-in at all, the
mechanism is visible in the console (the "protected" column), and moto implements it, so it is tested. The
remaining window (a message received, protection not yet set, the group picks this instance in that instant)
is covered by the worker's SIGTERM drain at shutdown and, at worst, SQS redelivery: at-least-once as always.
``InstanceProtection`` is the worker's half; ``sdasync worker --asg-protect <group>`` turns it on.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Self
from urllib.parse import urlsplit

import httpx

from sdasync.awsclient import LazyClient, translate_errors
from sdasync.errors import ConfigError, MetadataError, MetadataUnavailable, SdasyncError
from sdasync.imds import ImdsClient
from sdasync.urls import query_params

log = logging.getLogger(__name__)

URL_PARAMS: dict[str, type[Any]] = {"region": str}
PENDING_STATES = frozenset({"Pending", "Pending:Wait", "Pending:Proceed", "Warmed:Pending"})


class AsgScaler:
    capabilities = frozenset({"remote", "drain", "scale_in_protection"})

    def __init__(self, group: str, *, region: str | None = None, client: Any = None) -> None:
        self.group = group
        self.region = region
        self._aws = LazyClient("autoscaling", region=region, client=client)

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> Self:
        group = urlsplit(url).netloc
        if not group:
            raise ConfigError(f"{url!r} names no Auto Scaling group: use asg://<group name>")
        return cls(group, **query_params(url, URL_PARAMS), **kwargs)

    @property
    def client(self) -> Any:
        return self._aws.get()

    def describe(self) -> dict[str, Any]:
        with translate_errors(f"describe Auto Scaling group {self.group}"):
            response = self.client.describe_auto_scaling_groups(AutoScalingGroupNames=[self.group])
        groups = response.get("AutoScalingGroups", [])
        if not groups:
            raise ConfigError(f"Auto Scaling group {self.group!r} not found")
        group: dict[str, Any] = groups[0]
        return group

    def capacity(self) -> tuple[int, int]:
        group = self.describe()
        instances = group.get("Instances", [])
        running = sum(1 for i in instances if i.get("LifecycleState") == "InService")
        booting = sum(1 for i in instances if i.get("LifecycleState") in PENDING_STATES)
        # Instances leaving (Terminating, Detaching, Standby) count as neither: they take no new tasks.
        unlaunched = max(0, int(group.get("DesiredCapacity", 0)) - running - booting)
        return running, booting + unlaunched

    def set_desired(self, n: int) -> None:
        if n < 0:
            raise ValueError(f"desired capacity must be >= 0, not {n}")
        group = self.describe()
        low, high = int(group.get("MinSize", 0)), int(group.get("MaxSize", n))
        clamped = min(max(n, low), high)
        if clamped != n:
            log.warning("group %s: desired %d is outside MinSize %d..MaxSize %d; asking for %d",
                        self.group, n, low, high, clamped)
        if int(group.get("DesiredCapacity", -1)) == clamped:
            return
        log.info("group %s: desired capacity -> %d", self.group, clamped)
        with translate_errors(f"set desired capacity of {self.group}"):
            self.client.set_desired_capacity(AutoScalingGroupName=self.group, DesiredCapacity=clamped,
                                             HonorCooldown=False)

    def close(self) -> None:
        self._aws.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class InstanceProtection:
    """The worker's half of scale-in safety: protect this instance while busy, unprotect it when idle.

    ``busy(flag)`` sends SetInstanceProtection only when the flag changes, so a worker going from task to task
    makes no AWS calls. Failures are logged, never raised: losing protection costs at most a handed-back task,
    while a worker that stopped on a throttled API call would cost the whole queue."""

    def __init__(self, group: str, instance_id: str, *, region: str | None = None, client: Any = None) -> None:
        self.group = group
        self.instance_id = instance_id
        self._aws = LazyClient("autoscaling", region=region, client=client)
        self._protected: bool | None = None
        self._lock = threading.Lock()

    def busy(self, flag: bool) -> None:
        with self._lock:
            if self._protected == flag:
                return
            try:
                with translate_errors(f"set scale-in protection of {self.instance_id}"):
                    self._aws.get().set_instance_protection(AutoScalingGroupName=self.group,
                                                         InstanceIds=[self.instance_id],
                                                         ProtectedFromScaleIn=flag)
            except SdasyncError as exc:
                log.warning("%s; the group may pick this instance for scale-in", exc)
                return
            self._protected = flag
            log.info("instance %s %s from scale-in", self.instance_id, "protected" if flag else "unprotected")

    def close(self) -> None:
        self.busy(False)
        self._aws.close()


def instance_id_from_imds(base_url: str | None = None, instance_id: str | None = None,
                          timeout_s: float = 2.0) -> str:
    """This instance's id: ``instance_id`` when given (``Settings.instance_id``, so the worker can be tested and
    run where IMDS is blocked), else IMDSv2's ``meta-data/instance-id`` at ``base_url`` (None: EC2's own
    address). Raises ConfigError when neither answers."""
    if instance_id:
        return instance_id
    imds = ImdsClient(base_url, token_ttl_s=300, timeout=httpx.Timeout(timeout_s))
    try:
        with imds:
            answer = imds.get("/latest/meta-data/instance-id")
    except (MetadataUnavailable, MetadataError) as exc:
        raise ConfigError(f"--asg-protect needs this instance's id: IMDS at {imds.base_url} did not answer "
                          f"({exc}); set SDASYNC_INSTANCE_ID") from exc
    if not answer or not answer.strip():
        raise ConfigError(f"--asg-protect needs this instance's id: IMDS at {imds.base_url} has none; "
                          f"set SDASYNC_INSTANCE_ID")
    return answer.strip()
