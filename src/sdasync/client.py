"""A small HTTP client for a running sdasync API; ``sdasync submit`` and ``sdasync status`` use it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Self

import httpx

from sdasync.errors import SdasyncError

TERMINAL = {"succeeded", "failed", "cancelled"}


class ClientError(SdasyncError):
    code = "client_error"

    def __init__(self, message: str, *, status: int | None = None, body: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = body


class Client:
    def __init__(self, url: str = "http://127.0.0.1:8080", *, timeout_s: float = 30.0,
                 api_key: str | None = None) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=url, timeout=timeout_s, headers=headers)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ClientError(f"cannot reach {self._http.base_url}: {exc}") from exc
        try:
            body = response.json()
        except ValueError:
            body = response.text
        if response.is_error:
            error = body.get("error", {}) if isinstance(body, dict) else {}
            message = error.get("message") or f"HTTP {response.status_code}"
            raise ClientError(message, status=response.status_code, body=body)
        return body

    def submit(self, payload: dict[str, Any], *, api: str = "/sdapi/v1/txt2img") -> str:
        body = self._call("POST", "/task", json={"api": api, "payload": payload})
        return str(body["taskId"])

    def get(self, task_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", f"/tasks/{task_id}")
        return result

    def cancel(self, task_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("DELETE", f"/tasks/{task_id}")
        return result

    def wait(self, task_id: str, *, timeout_s: float = 600.0, poll_s: float = 0.5) -> dict[str, Any]:
        """Poll until the task is finished; raises ClientError after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            task = self.get(task_id)
            if task["status"] in TERMINAL:
                return task
            if time.monotonic() >= deadline:
                raise ClientError(f"task {task_id} still {task['status']} after {timeout_s} s")
            time.sleep(poll_s)

    def download(self, url: str, dest: Path) -> Path:
        try:
            response = self._http.get(url)
            response.raise_for_status()
        except httpx.HTTPError as exc:
            raise ClientError(f"cannot download {url}: {exc}") from exc
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(response.content)
        return dest
