"""The web dashboard at ``/``: one HTML page and its static files (plain JS + CSS, no build step).

The page is a hash-routed single page that talks only to the public JSON API (jobs, metrics, events,
datasets, generate, /v1/models) and reads the new-job form's defaults from ``/openapi.json``. Static files
are served from a fixed list, so no request path reaches the disk. ``/favicon.ico`` answers the icon that
browsers ask for on their own (the page itself links the SVG one).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from app.api.errors import ApiError

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".ico": "image/x-icon"}
#: The files the page may load, by name; anything else is a 404.
STATIC_FILES = {p.name: p for p in STATIC_DIR.iterdir() if p.is_file() and p.suffix in _TYPES} \
    if STATIC_DIR.is_dir() else {}

router = APIRouter(include_in_schema=False)


@router.get("/")
def dashboard() -> FileResponse:
    return static_file("index.html")


@router.get("/favicon.ico")
def favicon() -> FileResponse:
    return static_file("favicon.ico")


@router.get("/static/{name}")
def static_file(name: str) -> FileResponse:
    path = STATIC_FILES.get(name)
    if path is None:
        raise ApiError(404, "not_found", f"no static file {name!r}")
    return FileResponse(path, media_type=_TYPES[path.suffix], headers={"Cache-Control": "no-cache"})
