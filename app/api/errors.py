"""The one error builder: every failure becomes an ``ApiError`` (status, code, message, field), and one
function renders it in either shape: ftaas's envelope ``{"error": {"code", "message", "field"}}`` for every
4xx and 5xx, or OpenAI's ``{"error": {"message", "type", "param", "code"}}`` under ``/v1`` (422 becomes 400
there, as OpenAI answers), with OpenAI's words for validation errors, unknown URLs and wrong methods (also for
paths under ``/v1`` that no route matches). A worker's ``UserFacingError`` code gets its status from
``USER_ERROR_STATUS``.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.core.errors import UserFacingError

log = logging.getLogger("ftaas.api")
Shape = Literal["ftaas", "openai"]


class ApiError(Exception):
    """An error a route or a service raises to answer with the envelope."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.field, self.headers = status, code, message, field, headers


#: The HTTP status of a ``UserFacingError`` code (raised by the worker or by app.core's checks); others: 422.
USER_ERROR_STATUS: dict[str, int] = {"adapter_not_found": 404, "generate_failed": 502, "unsupported_task": 503}
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large", 415: "unsupported_media_type"}
#: ftaas field names as OpenAI's ``param`` (None: the id is in the path, OpenAI names no param for it).
_OPENAI_PARAMS: dict[str, str | None] = {"base_model": "model", "adapter": "model", "dataset.id": "training_file",
                                         "validation.dataset.id": "validation_file", "id": None}
_OPENAI_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}
_OPENAI_HEADERS = ("retry-after", "allow", "www-authenticate")


def user_error(e: UserFacingError) -> ApiError:
    """A ``UserFacingError`` as the API answers it (the status from ``USER_ERROR_STATUS``)."""
    return ApiError(USER_ERROR_STATUS.get(e.code, 422), e.code, e.message, e.field)


def wire_status(status: int, shape: Shape = "ftaas") -> int:
    return 400 if shape == "openai" and status == 422 else status


def error_body(err: ApiError, shape: Shape = "ftaas") -> dict[str, Any]:
    """The error's JSON body in ftaas's or OpenAI's shape (also the SSE ``error`` frame's data)."""
    if shape == "ftaas":
        return {"error": {"code": err.code, "message": err.message, "field": err.field}}
    status = wire_status(err.status, shape)
    kind = _OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    param = _OPENAI_PARAMS.get(err.field, err.field) if err.field is not None else None
    return {"error": {"message": err.message, "type": kind, "param": param, "code": err.code}}


def error_response(err: ApiError, shape: Shape = "ftaas") -> JSONResponse:
    headers = err.headers
    if shape == "openai" and headers:
        headers = {k: v for k, v in headers.items() if k.lower() in _OPENAI_HEADERS}
    return JSONResponse(error_body(err, shape), wire_status(err.status, shape), headers=headers)


def envelope(status: int, code: str, message: str, field: str | None = None,
             headers: dict[str, str] | None = None) -> JSONResponse:
    return error_response(ApiError(status, code, message, field, headers))


_UNION_TAGS = {"str", "int", "float", "bool", "none", "constrained-str", "function-after", "function-plain"}


def _field_of(loc: tuple[Any, ...]) -> str | None:
    """Dotted path of the offending field, without pydantic's union-member tags (``list[ChatMessage]``)."""
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")
             and not (isinstance(p, str) and (p in _UNION_TAGS or "[" in p))]
    return ".".join(parts) or None


def shape_of(path: str) -> Shape:
    """OpenAI's shape for everything under ``/v1``, matched by a route or not; ftaas's elsewhere."""
    return "openai" if path == "/v1" or path.startswith("/v1/") else "ftaas"


def _openai_words(kind: str, field: str | None, message: str) -> str:
    """A validation problem as OpenAI words it (``field`` in OpenAI's terms)."""
    if field is None:
        return message
    if kind == "extra_forbidden":
        return f"Unrecognized request argument supplied: {field}"
    if kind == "missing":
        return f"Missing required parameter: '{field}'."
    return f"Invalid value for '{field}': {message}"


def _invalid(exc: RequestValidationError, shape: Shape = "ftaas") -> ApiError:
    # the deepest location is the most specific one (e.g. the member of a union that almost matched)
    first = max(exc.errors(), key=lambda e: len(e.get("loc", ())))
    if first.get("type") == "json_invalid":
        words = ("We could not parse the JSON body of your request" if shape == "openai"
                 else "request body is not valid JSON")
        return ApiError(400, "invalid_json", f"{words}: {first.get('msg')}")
    field = _field_of(tuple(first.get("loc", ())))
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if shape == "openai":
        message = _openai_words(str(first.get("type")), _OPENAI_PARAMS.get(field, field) if field else None, message)
    elif field:
        message = f"{field}: {message}"
    more = len(exc.errors()) - 1
    if more:
        message += f" (and {more} more problem{'s' if more > 1 else ''})"
    return ApiError(422, "invalid_request", message, field)


def _http_error(request: Request, exc: StarletteHTTPException, shape: Shape) -> ApiError:
    message = str(exc.detail)
    if shape == "openai" and exc.status_code == 404 and message == "Not Found":
        message = f"Invalid URL ({request.method} {request.url.path})"
    elif shape == "openai" and exc.status_code == 405 and message == "Method Not Allowed":
        message = f"Invalid method for URL ({request.method} {request.url.path})"
    return ApiError(exc.status_code, _HTTP_CODES.get(exc.status_code, "http_error"), message,
                    headers=getattr(exc, "headers", None))


def as_api_error(request: Request, exc: Exception, shape: Shape = "ftaas") -> ApiError:
    """Any exception as the error the API answers with (an unexpected one is logged and becomes a 500);
    ``shape`` picks the words of validation and routing errors."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, UserFacingError):
        return user_error(exc)
    if isinstance(exc, RequestValidationError):
        return _invalid(exc, shape)
    if isinstance(exc, StarletteHTTPException):
        return _http_error(request, exc, shape)
    if isinstance(exc, redis.RedisError):
        log.warning("redis unavailable: %s", exc)
        return ApiError(503, "store_unavailable", "the job store (Redis) is not answering; try again shortly")
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return ApiError(500, "internal_error", "internal server error; the details are in the server log")


def _on_error(request: Request, exc: Exception) -> JSONResponse:
    shape = shape_of(request.url.path)
    return error_response(as_api_error(request, exc, shape), shape)


def install(app: FastAPI) -> None:
    for kind in (RequestValidationError, ApiError, UserFacingError, StarletteHTTPException, redis.RedisError,
                 Exception):
        app.add_exception_handler(kind, _on_error)
