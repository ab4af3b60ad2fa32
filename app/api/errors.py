"""The one error envelope, ``{"error": {"code", "message", "field"}}``, for every 4xx and 5xx."""

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("ftaas.api")


class ApiError(Exception):
    """An error a route raises to answer with the envelope."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.field, self.headers = status, code, message, field, headers


def envelope(status: int, code: str, message: str, field: str | None = None,
             headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, "field": field}}, status, headers=headers)


_UNION_TAGS = {"str", "int", "float", "bool", "none", "constrained-str", "function-after", "function-plain"}


def _field_of(loc: tuple[Any, ...]) -> str | None:
    """Dotted path of the offending field, without pydantic's union-member tags (``list[ChatMessage]``)."""
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")
             and not (isinstance(p, str) and (p in _UNION_TAGS or "[" in p))]
    return ".".join(parts) or None


def _on_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
    # the deepest location is the most specific one (e.g. the member of a union that almost matched)
    first = max(exc.errors(), key=lambda e: len(e.get("loc", ())))
    if first.get("type") == "json_invalid":
        return envelope(400, "invalid_json", f"request body is not valid JSON: {first.get('msg')}")
    field = _field_of(tuple(first.get("loc", ())))
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if field:
        message = f"{field}: {message}"
    more = len(exc.errors()) - 1
    if more:
        message += f" (and {more} more problem{'s' if more > 1 else ''})"
    return envelope(422, "invalid_request", message, field)


def _on_api_error(_: Request, exc: ApiError) -> JSONResponse:
    return envelope(exc.status, exc.code, exc.message, exc.field, exc.headers)


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large", 415: "unsupported_media_type"}


def _on_http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    return envelope(exc.status_code, code, str(exc.detail), headers=getattr(exc, "headers", None))


def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return envelope(500, "internal_error", "internal server error; the details are in the server log")


def install(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _on_validation)  # type: ignore[arg-type]
    app.add_exception_handler(ApiError, _on_api_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _on_http)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _on_unexpected)
