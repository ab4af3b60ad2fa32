"""OpenAI's server-sent chunks, relayed from the generate worker's stream as the text is generated.

``stream_generate`` (app/api/services/generate.py) yields SSE frames: ``token`` ({index, text}: a new piece of
output ``index``), then ``done`` (the whole response) or ``error``, with keep-alive comments while waiting.
Each piece becomes one chunk of its choice (``index`` = the output's, prompt-major); ``done`` gives each choice
its last chunk (any text the pieces missed, ``finish_reason`` and, when asked, the choice's logprobs for all
its tokens, so clients that concatenate them get the whole list), then the usage chunk
(``stream_options.include_usage``: empty ``choices``, as OpenAI sends it) and ``data: [DONE]``. An error ends
the stream with ``data: {"error": …}`` in OpenAI's shape, which the official client raises.

Completion chunks carry ``finish_reason: null`` until a choice's last chunk, as OpenAI sends them (the
official client's ``CompletionChoice`` type, shared with whole answers, does not allow null there).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from fastapi.responses import StreamingResponse

from app.api.errors import USER_ERROR_STATUS, ApiError, error_body
from app.api.openai.completions import chat_logprobs, completion_logprobs, usage
from app.api.openai.params import ChatCompletionCreate, CompletionCreate

_DONE = "data: [DONE]\n\n"
_KEEP_ALIVE = ": keep-alive\n\n"


def _data(chunk: dict[str, Any]) -> str:
    return f"data: {json.dumps(chunk)}\n\n"


def _events(frames: Iterator[str]) -> Iterator[tuple[str | None, dict[str, Any]]]:
    """(event, data) of each SSE frame; (None, {}) for a comment (a keep-alive)."""
    for frame in frames:
        event, data = None, "{}"
        for line in frame.splitlines():
            if line.startswith("event:"):
                event = line.removeprefix("event:").strip()
            elif line.startswith("data:"):
                data = line.removeprefix("data:").strip()
        yield event, json.loads(data)


def _error(data: dict[str, Any]) -> str:
    err = data.get("error") or {}
    code = str(err.get("code") or "generate_failed")
    status = 504 if code == "generate_timeout" else USER_ERROR_STATUS.get(code, 422)
    return _data(error_body(ApiError(status, code, str(err.get("message") or code), err.get("field")), "openai"))


class _Relay:
    """Turns the worker's events into OpenAI chunks; subclasses say what a chunk holds."""

    def __init__(self, head: dict[str, Any], outputs: int, n: int, include_usage: bool) -> None:
        self.head, self.n, self.include_usage = head, n, include_usage
        self.sent = [""] * outputs

    def start(self) -> list[dict[str, Any]]:
        return []

    def piece(self, index: int, text: str) -> dict[str, Any]:
        raise NotImplementedError

    def last(self, index: int, rest: str, output: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def chunk(self, choice: dict[str, Any]) -> dict[str, Any]:
        return self.head | {"choices": [choice]}

    def frames(self, worker: Iterator[str]) -> Iterator[str]:
        for chunk in self.start():
            yield _data(chunk)
        for event, data in _events(worker):
            if event == "token":
                index = int(data["index"])
                self.sent[index] += data["text"]
                yield _data(self.chunk(self.piece(index, data["text"])))
            elif event == "done":
                outputs = data["outputs"]
                for k, o in enumerate(outputs):
                    whole, sent = o["text"], self.sent[k]
                    rest = whole[len(sent):] if whole.startswith(sent) else ""
                    yield _data(self.chunk(self.last(k, rest, o)))
                if self.include_usage:
                    yield _data(self.head | {"choices": [], "usage": usage(outputs, self.n)})
                yield _DONE
                return
            elif event == "error":
                yield _error(data)
                return
            else:
                yield _KEEP_ALIVE


class _CompletionRelay(_Relay):
    def __init__(self, head: dict[str, Any], body: CompletionCreate, prompts: list[str]) -> None:
        super().__init__(head, len(prompts) * body.choices_per_prompt, body.choices_per_prompt, body.include_usage)
        self.body, self.prompts = body, prompts

    def start(self) -> list[dict[str, Any]]:
        if not self.body.echo:
            return []
        return [self.chunk(self.piece(k, self.prompts[k // self.n])) for k in range(len(self.sent))]

    def piece(self, index: int, text: str) -> dict[str, Any]:
        return {"index": index, "text": text, "logprobs": None, "finish_reason": None}

    def last(self, index: int, rest: str, output: dict[str, Any]) -> dict[str, Any]:
        logprobs = completion_logprobs(output) if self.body.logprobs is not None else None
        return {"index": index, "text": rest, "logprobs": logprobs, "finish_reason": output["finish_reason"]}


class _ChatRelay(_Relay):
    def __init__(self, head: dict[str, Any], body: ChatCompletionCreate) -> None:
        super().__init__(head, body.choices_per_prompt, body.choices_per_prompt, body.include_usage)
        self.body = body

    def start(self) -> list[dict[str, Any]]:
        return [self.chunk({"index": j, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                            "finish_reason": None}) for j in range(self.n)]

    def piece(self, index: int, text: str) -> dict[str, Any]:
        return {"index": index, "delta": {"content": text}, "logprobs": None, "finish_reason": None}

    def last(self, index: int, rest: str, output: dict[str, Any]) -> dict[str, Any]:
        logprobs = chat_logprobs(output, self.body.top_logprobs or 0) if self.body.logprobs else None
        return {"index": index, "delta": {"content": rest} if rest else {}, "logprobs": logprobs,
                "finish_reason": output["finish_reason"]}


def _response(frames: Iterator[str]) -> StreamingResponse:
    return StreamingResponse(frames, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def completion_stream(head: dict[str, Any], body: CompletionCreate, prompts: list[str],
                      worker: Iterator[str]) -> StreamingResponse:
    return _response(_CompletionRelay(head, body, prompts).frames(worker))


def chat_stream(head: dict[str, Any], body: ChatCompletionCreate, worker: Iterator[str]) -> StreamingResponse:
    return _response(_ChatRelay(head | {"object": "chat.completion.chunk"}, body).frames(worker))
