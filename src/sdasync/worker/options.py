"""A worker's knobs, in one frozen dataclass (``Worker(config=...)``; ``worker/command.py`` fills it from Settings)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field


@dataclass(frozen=True)
class WorkerConfig:
    visibility_timeout_s: float = 60.0
    max_attempts: int = 3
    #: Long-poll wait per receive; also how quickly an idle worker notices a stop request.
    wait_s: float = 1.0
    backoff_base_s: float = 2.0
    backoff_max_s: float = 120.0
    #: Progress is written to the task store at most this often.
    progress_interval_s: float = 1.0
    #: After a stop request, how long the current task may run before it is interrupted and handed back.
    drain_timeout_s: float = 90.0
    #: How often a worker whose engine is down probes it (doubling up to 8 times this).
    engine_probe_s: float = 2.0
    #: A generation running longer is interrupted and retried; None derives it from steps, size and images.
    generation_timeout_s: float | None = None
    worker_id: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    #: The engine's URL, for the log and the registry record (credentials are stripped from it there).
    engine_url: str = ""
    #: How often the worker's registry record is refreshed; it expires after three missed beats.
    heartbeat_s: float = 5.0
    #: How often a wait for the engine says so in the log.
    wait_log_s: float = 15.0
