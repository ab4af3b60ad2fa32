"""OpenAI completion requests as ftaas generate requests, and the generate worker's outputs as OpenAI choices,
log probabilities and usage (whole answers here; the streamed chunks in app/api/openai/streaming.py).

The native request carries ``n`` choices per prompt, ``logprobs`` (top alternatives, None: none) and ``echo``;
its outputs are prompt-major (``outputs[i * n + j]``: prompt i, choice j), which is the order and the ``index``
of OpenAI's choices. Each output counts its prompt's tokens (``prompt_tokens``); usage counts each prompt once.
"""

from __future__ import annotations

from typing import Any

from app.api.errors import ApiError
from app.api.openai.mapping import build
from app.api.openai.params import ChatCompletionCreate, ChatMessageIn, CompletionCreate
from app.api.schemas import GenerateRequest

#: ftaas generate fields -> the OpenAI field a problem with them names.
COMPLETION_PARAMS = {"prompts": "prompt", "prompt": "prompt", "max_new_tokens": "max_tokens", "n": "n",
                     "logprobs": "logprobs", "echo": "echo", "temperature": "temperature", "top_p": "top_p",
                     "seed": "seed", "stop": "stop", "presence_penalty": "presence_penalty",
                     "frequency_penalty": "frequency_penalty", "logit_bias": "logit_bias",
                     "response_format": "response_format"}
CHAT_PARAMS = COMPLETION_PARAMS | {"prompts": "messages", "prompt": "messages", "logprobs": "top_logprobs",
                                   "max_new_tokens": "max_completion_tokens"}


def render_chat(messages: list[ChatMessageIn]) -> str:
    """Gemma's chat format (what its tokenizer's template makes, without ``<bos>``, which the
    tokenizer adds): system and developer text goes before the first user turn."""
    system = "\n\n".join(m.text.strip() for m in messages if m.role in ("system", "developer"))
    turns = [("model" if m.role == "assistant" else "user", m.text.strip())
             for m in messages if m.role in ("user", "assistant")]
    if system:
        turns = [("user", f"{system}\n\n{turns[0][1]}"), *turns[1:]] if turns and turns[0][0] == "user" else [
            ("user", system), *turns]
    return "".join(f"<start_of_turn>{role}\n{text}<end_of_turn>\n" for role, text in turns) + "<start_of_turn>model\n"


def native_request(body: CompletionCreate | ChatCompletionCreate, prompts: list[str], max_tokens: int,
                   adapter: str | None, base: str, params: dict[str, str]) -> GenerateRequest:
    """The generate request an OpenAI body asks for. Temperature 0 is greedy decoding; ``n``, ``logprobs``,
    ``echo``, penalties, ``logit_bias`` and ``response_format`` are sent only when asked, so a request without
    them is the plain one."""
    temperature = 1.0 if body.temperature is None else body.temperature
    fields: dict[str, Any] = {
        "prompts": prompts, "adapter": adapter, "base_model": None if adapter else base,
        "max_new_tokens": max_tokens, "do_sample": temperature > 0, "temperature": temperature or 1.0,
        "top_p": body.top_p or 1.0, "top_k": 0, "seed": body.seed, "stop": body.stop_list}
    if body.choices_per_prompt != 1:
        fields["n"] = body.choices_per_prompt
    logprobs = top_alternatives(body)
    if logprobs is not None:
        fields["logprobs"] = logprobs
    if isinstance(body, CompletionCreate) and body.echo:
        fields["echo"] = True
    for name in ("presence_penalty", "frequency_penalty", "logit_bias"):  # sent only when they change something
        if getattr(body, name):
            fields[name] = getattr(body, name)
    if body.native_format is not None:
        fields["response_format"] = body.native_format
    return build(GenerateRequest, params, **fields)


def top_alternatives(body: CompletionCreate | ChatCompletionCreate) -> int | None:
    """The native ``logprobs``: top alternatives per token, None when no log probabilities are asked."""
    if isinstance(body, CompletionCreate):
        return body.logprobs
    return (body.top_logprobs or 0) if body.logprobs else None


def renamed(err: ApiError, params: dict[str, str]) -> ApiError:
    """A native error (e.g. a deployment limit on ``max_new_tokens``) naming the OpenAI field."""
    if err.field in params:
        err.field = params[err.field]
    return err


def usage(outputs: list[dict[str, Any]], n: int) -> dict[str, int]:
    """Prompt tokens counted once per prompt (its n choices share it), completion tokens of every choice."""
    prompt = sum(int(o.get("prompt_tokens") or 0) for o in outputs[::max(1, n)])
    completion = sum(int(o["tokens"]) for o in outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion_logprobs(output: dict[str, Any]) -> dict[str, Any] | None:
    """OpenAI's legacy logprobs object. An echoed first prompt token has no log probability: null, as
    OpenAI answers (docs/openai.md says why the official client's types disagree)."""
    lp = output.get("logprobs")
    if lp is None:
        return None
    return {"tokens": lp["tokens"], "token_logprobs": lp["token_logprobs"], "top_logprobs": lp["top_logprobs"],
            "text_offset": lp["text_offset"]}


def _token(text: str, logprob: float | None) -> dict[str, Any]:
    return {"token": text, "logprob": -9999.0 if logprob is None else logprob, "bytes": list(text.encode())}


def chat_logprobs(output: dict[str, Any], top: int) -> dict[str, Any] | None:
    """Chat's logprobs: each reply token with its ``top`` likeliest alternatives, most likely first."""
    lp = output.get("logprobs")
    if lp is None:
        return None
    content = []
    for text, logprob, alternatives in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], strict=True):
        ranked = sorted((alternatives or {}).items(), key=lambda kv: -kv[1])[:top]
        content.append(_token(text, logprob) | {"top_logprobs": [_token(t, v) for t, v in ranked]})
    return {"content": content, "refusal": None}


def completion_choices(outputs: list[dict[str, Any]], prompts: list[str],
                       body: CompletionCreate) -> list[dict[str, Any]]:
    n, echo = body.choices_per_prompt, bool(body.echo)
    return [{"index": k, "text": (prompts[k // n] if echo else "") + o["text"], "finish_reason": o["finish_reason"],
             "logprobs": completion_logprobs(o) if body.logprobs is not None else None}
            for k, o in enumerate(outputs)]


def chat_choices(outputs: list[dict[str, Any]], body: ChatCompletionCreate) -> list[dict[str, Any]]:
    top = body.top_logprobs or 0
    return [{"index": j, "message": {"role": "assistant", "content": o["text"], "refusal": None},
             "finish_reason": o["finish_reason"], "logprobs": chat_logprobs(o, top) if body.logprobs else None}
            for j, o in enumerate(outputs)]
