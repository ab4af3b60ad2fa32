"""The CLI's HTTP client: ``FTAAS_URL`` and ``FTAAS_API_KEY``, the error envelope, and SSE streams.

HTTP only (httpx): nothing here imports the API, Redis or torch.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
#: Reconnects of a dropped event stream (resumed with Last-Event-ID) before giving up.
STREAM_RETRIES = 5


class CliError(Exception):
    """A failure shown as one line, ``error: <code>: <message>``, with a non-zero exit code."""

    def __init__(self, code: str, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.code, self.message, self.exit_code = code, " ".join(message.split()), exit_code

    def line(self) -> str:
        return f"error: {self.code}: {self.message}"


class Unreachable(CliError):
    """Nothing answers at ``FTAAS_URL`` (exit code 2)."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__("unreachable", f"cannot reach the ftaas server at {url} (FTAAS_URL): {reason}", 2)


def server_error(resp: httpx.Response) -> CliError:
    """The server's envelope ``{"error": {"code", "message", "field"}}`` as a CliError."""
    try:
        body = json.loads(resp.read())
        err = body["error"]
        return CliError(str(err["code"]), str(err["message"]))
    except (ValueError, KeyError, TypeError):
        text = resp.text.strip()[:200] or resp.reason_phrase
        return CliError(f"http_{resp.status_code}", text)


def iter_sse(lines: Iterator[str]) -> Iterator[dict[str, str]]:
    """Server-sent event frames (``id``, ``event``, ``data``) from a stream's lines; comments are skipped."""
    frame: dict[str, str] = {}
    for line in lines:
        if not line:
            if "data" in frame:
                yield frame
            frame = {}
        elif line.startswith(":"):
            continue
        else:
            key, _, value = line.partition(":")
            value = value.removeprefix(" ")
            frame[key] = frame[key] + "\n" + value if key == "data" and key in frame else value
    if "data" in frame:
        yield frame


class Client:
    """A thin wrapper over ``httpx.Client`` that turns every failure into a :class:`CliError`."""

    def __init__(self, url: str | None = None, api_key: str | None = None, timeout: float = 60.0) -> None:
        self.url = (url or DEFAULT_URL).rstrip("/")  # typer reads --url / FTAAS_URL and --api-key / FTAAS_API_KEY
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.http.close()

    def _transport(self, e: httpx.TransportError) -> CliError:
        if isinstance(e, httpx.ConnectError | httpx.ConnectTimeout):
            return Unreachable(self.url, str(e) or type(e).__name__)
        return CliError("transport_error", f"{type(e).__name__} talking to {self.url}: {e}")

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """Send a request; the decoded JSON body (None when empty), or CliError."""
        try:
            resp = self.http.request(method, path, **kwargs)
        except httpx.TransportError as e:
            raise self._transport(e) from None
        if resp.status_code >= 400:
            raise server_error(resp)
        return resp.json() if resp.content else None

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> Any:
        return self.request("POST", path, **kwargs)

    def upload(self, path: Path) -> dict[str, Any]:
        """``POST /datasets`` with the file as the multipart field ``file``."""
        try:
            with path.open("rb") as f:
                result: dict[str, Any] = self.post("/datasets", files={"file": (path.name, f)}, timeout=600)
        except OSError as e:
            raise CliError("file_unreadable", f"cannot read {path}: {e.strerror or e}") from None
        return result

    def stream_post(self, path: str, body: dict[str, Any], timeout: float = 900) -> Iterator[str]:
        """POST; yields the text pieces of an SSE answer as they arrive, or the whole text of a JSON one.

        A JSON answer is ``{"outputs": [{"text"}]}`` (``/generate``); an SSE answer's frames carry
        ``{"text"}`` (or OpenAI-style ``choices[0].text`` / ``delta.content``) until ``[DONE]``.
        """
        headers = {"Accept": "text/event-stream, application/json"}
        try:
            with self.http.stream("POST", path, json=body, headers=headers, timeout=timeout) as resp:
                if resp.status_code >= 400:
                    raise server_error(resp)
                if not resp.headers.get("content-type", "").startswith("text/event-stream"):
                    resp.read()
                    yield "\n".join(o["text"] for o in resp.json().get("outputs", []))
                    return
                for frame in iter_sse(resp.iter_lines()):
                    if frame["data"].strip() == "[DONE]":
                        return
                    data = json.loads(frame["data"])
                    if frame.get("event") == "error" or "error" in data:
                        err = data.get("error", data)
                        raise CliError(str(err.get("code", "stream_error")), str(err.get("message", err)))
                    yield _text_of(data)
        except httpx.TransportError as e:
            raise self._transport(e) from None

    def events(self, job_id: str, last_id: str | None = None) -> Iterator[dict[str, Any]]:
        """The job's live event stream until the job ends; a dropped connection resumes from the last id."""
        failures = 0
        while True:
            headers = {"Accept": "text/event-stream"} | ({"Last-Event-ID": last_id} if last_id else {})
            try:
                with self.http.stream("GET", f"/jobs/{job_id}/events", headers=headers) as resp:
                    if resp.status_code >= 400:
                        raise server_error(resp)
                    for frame in iter_sse(resp.iter_lines()):
                        event: dict[str, Any] = json.loads(frame["data"])
                        last_id, failures = event.get("id", frame.get("id")), 0
                        yield event
                return  # the server ends the stream once the job has ended
            except httpx.TransportError as e:
                failures += 1
                if failures > STREAM_RETRIES:
                    raise self._transport(e) from None
                time.sleep(min(0.25 * 2**failures, 5))


def _text_of(data: dict[str, Any]) -> str:
    if "text" in data:
        return str(data["text"])
    choice = (data.get("choices") or [{}])[0]
    return str(choice.get("text") or (choice.get("delta") or {}).get("content") or "")
