"""Workers on an EC2 Spot Fleet request, sized through its target capacity.

URL: ``spotfleet://<spot fleet request id>`` (``spotfleet://sfr-0123…``). Query parameters: ``region``.

- ``capacity()`` reads DescribeSpotFleetRequests: running is ``FulfilledCapacity``, pending is what the target
  asks for beyond it (instances being requested or booting). Capacity units are the fleet's weights; with the
  usual weight 1 they are instances.
- ``set_desired(n)`` calls ModifySpotFleetRequest(TargetCapacity=n) only when the target differs: a fleet that
  is still ``modifying`` refuses a second change, so a redundant call would turn into an error.
- Scale-in: the fleet terminates instances (``ExcessCapacityTerminationPolicy`` default), which gets each
  worker a SIGTERM at shutdown; the worker drains its task or hands it back within its drain timeout. A Spot
  Fleet has no scale-in protection, so this is the only safety it gets.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Self
from urllib.parse import urlsplit

from sdasync.awsclient import LazyClient, translate_errors
from sdasync.errors import ConfigError
from sdasync.urls import query_params

log = logging.getLogger(__name__)

URL_PARAMS: dict[str, type[Any]] = {"region": str}


class SpotFleetScaler:
    capabilities = frozenset({"remote", "drain"})

    def __init__(self, request_id: str, *, region: str | None = None, client: Any = None) -> None:
        self.request_id = request_id
        self.region = region
        self._aws = LazyClient("ec2", region=region, client=client)

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> Self:
        request_id = urlsplit(url).netloc
        if not request_id:
            raise ConfigError(f"{url!r} names no spot fleet request: use spotfleet://sfr-…")
        return cls(request_id, **query_params(url, URL_PARAMS), **kwargs)

    @property
    def client(self) -> Any:
        return self._aws.get()

    def _config(self) -> dict[str, Any]:
        with translate_errors(f"describe spot fleet {self.request_id}"):
            response = self.client.describe_spot_fleet_requests(SpotFleetRequestIds=[self.request_id])
        configs = response.get("SpotFleetRequestConfigs", [])
        if not configs:
            raise ConfigError(f"spot fleet request {self.request_id} not found")
        config: dict[str, Any] = configs[0]
        return config

    def capacity(self) -> tuple[int, int]:
        data = self._config()["SpotFleetRequestConfig"]
        target = int(data.get("TargetCapacity", 0))
        # Fulfilled capacity is a float (weights); a half-fulfilled unit is not yet a worker.
        running = math.floor(float(data.get("FulfilledCapacity", 0.0)))
        return running, max(0, target - running)

    def target(self) -> int:
        return int(self._config()["SpotFleetRequestConfig"].get("TargetCapacity", 0))

    def set_desired(self, n: int) -> None:
        if n < 0:
            raise ValueError(f"desired capacity must be >= 0, not {n}")
        if self.target() == n:
            return
        log.info("spot fleet %s: target capacity -> %d", self.request_id, n)
        with translate_errors(f"modify spot fleet {self.request_id}"):
            self.client.modify_spot_fleet_request(SpotFleetRequestId=self.request_id, TargetCapacity=n)

    def close(self) -> None:
        self._aws.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
