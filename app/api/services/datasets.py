"""Uploaded datasets: receive and store an upload, the caller's dataset, its rows, the jobs on it, delete.

The upload is parsed with python-multipart's streaming parser as it arrives and written to a temporary
file in the dataset folder while its bytes are counted, so no more than one chunk of it is ever in
memory and an oversize one is cut off at the limit. The file is then checked and stored as JSONL under a
generated id (app/api/uploads.py); the user's filename is metadata only. A rejected upload leaves nothing.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterable
from pathlib import Path
from typing import Any, BinaryIO

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from app.api.errors import ApiError
from app.api.schemas import DatasetFormat
from app.api.uploads import detect_file_format, normalise
from app.core.apikeys import Principal
from app.core.ids import is_dataset_id, new_id
from app.core.paths import dataset_file, dataset_staging
from app.core.settings import Settings
from app.core.store import DatasetStore, JobStore

log = logging.getLogger("ftaas.api")
#: Room for the multipart boundaries and part headers around the file in a request's Content-Length.
MULTIPART_SLACK = 64 * 1024
FILE_FIELD = "file"


def not_found(ds_id: str, field: str = "id") -> ApiError:
    return ApiError(404, "dataset_not_found", f"no dataset with id {ds_id!r}", field)


def _too_large(limit: int) -> ApiError:
    return ApiError(413, "payload_too_large", f"the file is over the upload limit of {limit:,} bytes", FILE_FIELD)


class _FileReceiver:
    """python-multipart callbacks: the ``file`` part's bytes go to ``out`` as they arrive, counted."""

    def __init__(self, out: BinaryIO, limit: int) -> None:
        self.out, self.limit = out, limit
        self.headers: dict[bytes, bytes] = {}
        self.field, self.value = b"", b""
        self.in_file = self.ended = False
        self.filename: str | None = None
        self.format: DatasetFormat | None = None
        self.size = 0

    def callbacks(self) -> dict[str, Any]:
        return {"on_part_begin": self.part_begin, "on_header_field": self.header_field,
                "on_header_value": self.header_value, "on_header_end": self.header_end,
                "on_headers_finished": self.headers_finished, "on_part_data": self.part_data,
                "on_part_end": self.part_end, "on_end": self.end}

    def part_begin(self) -> None:
        self.headers, self.field, self.value = {}, b"", b""

    def header_field(self, data: bytes, start: int, end: int) -> None:
        self.field += data[start:end]

    def header_value(self, data: bytes, start: int, end: int) -> None:
        self.value += data[start:end]

    def header_end(self) -> None:
        self.headers[self.field.lower()] = self.value
        self.field, self.value = b"", b""

    def headers_finished(self) -> None:
        _, options = parse_options_header(self.headers.get(b"content-disposition", b""))
        if options.get(b"name") != FILE_FIELD.encode():
            return  # other fields are skipped (the request's size still counts them)
        if self.format is not None:
            raise ApiError(422, "invalid_request", "send one file per upload", FILE_FIELD)
        raw_name = options.get(b"filename")
        self.filename = raw_name.decode("utf-8", "replace")[-255:] if raw_name is not None else None
        content_type = self.headers.get(b"content-type")
        self.format = detect_file_format(self.filename, content_type.decode("latin-1") if content_type else None)
        self.in_file = True

    def part_data(self, data: bytes, start: int, end: int) -> None:
        if self.in_file:
            self.size += end - start
            if self.size > self.limit:
                raise _too_large(self.limit)
            self.out.write(data[start:end])

    def part_end(self) -> None:
        self.in_file = False

    def end(self) -> None:
        self.ended = True


async def _receive(chunks: AsyncIterable[bytes], content_type_header: str, content_length: str, dest: Path,
                   limit: int) -> _FileReceiver:
    """Stream the multipart body's ``file`` part to ``dest``; 413 as soon as it is over ``limit``."""
    content_type, options = parse_options_header(content_type_header)
    if content_type != b"multipart/form-data" or not options.get(b"boundary"):
        raise ApiError(415, "unsupported_media_type",
                       f"upload the file as multipart/form-data in a field named {FILE_FIELD!r}")
    if content_length.isdigit() and int(content_length) > limit + MULTIPART_SLACK:
        raise _too_large(limit)
    received = 0
    with dest.open("wb") as out:
        receiver = _FileReceiver(out, limit)
        parser = MultipartParser(options[b"boundary"], receiver.callbacks())  # type: ignore[arg-type]
        try:
            async for chunk in chunks:
                received += len(chunk)
                if received > limit + MULTIPART_SLACK:
                    raise _too_large(limit)
                parser.write(chunk)
            parser.finalize()
        except FormParserError as e:
            raise ApiError(400, "invalid_multipart", f"the multipart body does not parse: {e}") from None
        except ClientDisconnect:
            raise ApiError(400, "upload_incomplete", "the client went away before the upload ended") from None
    if not receiver.ended:
        raise ApiError(400, "invalid_multipart", "the multipart body ended before its closing boundary")
    if receiver.format is None:
        raise ApiError(422, "invalid_request", f"the upload has no file in a field named {FILE_FIELD!r}",
                       FILE_FIELD)
    return receiver


def _store_upload(cfg: Settings, ds: DatasetStore, ds_id: str, upload: Path, staged: Path,
                  got: _FileReceiver, tenant: str) -> dict[str, Any]:
    """Check and normalise the received file, move it into place and record it (in a worker thread)."""
    assert got.format is not None
    summary = normalise(upload, got.format, staged)
    final = dataset_file(cfg, ds_id)
    staged.replace(final)
    meta = {"id": ds_id, "object": "dataset", "filename": got.filename or "", "format": got.format,
            "row_count": summary.row_count, "dropped_rows": summary.dropped_rows,
            "columns": sorted(summary.columns), "bytes": got.size, "created_at": time.time(),
            "preview": summary.preview, "tenant": tenant}
    try:
        ds.create(ds_id, meta)
    except BaseException:
        final.unlink(missing_ok=True)
        raise
    return meta


async def upload_dataset(chunks: AsyncIterable[bytes], content_type: str, content_length: str, cfg: Settings,
                         ds: DatasetStore, caller: Principal) -> dict[str, Any]:
    """Receive a multipart upload (its body's chunks and headers) and store it as the caller's dataset."""
    ds_id = new_id("ds")
    cfg.dataset_dir.mkdir(parents=True, exist_ok=True)
    upload, staged = dataset_staging(cfg, ds_id)
    try:
        got = await _receive(chunks, content_type, content_length, upload, cfg.max_upload_bytes)
        meta = await run_in_threadpool(_store_upload, cfg, ds, ds_id, upload, staged, got, caller.tenant)
    finally:
        upload.unlink(missing_ok=True)
        staged.unlink(missing_ok=True)
    log.info("dataset %s: %s rows of %s (%d bytes)", ds_id, meta["row_count"], meta["format"], meta["bytes"])
    return meta


def owned_dataset(ds: DatasetStore, ds_id: str, caller: Principal, field: str = "id") -> dict[str, Any]:
    """The dataset's metadata; 404 when there is none or another tenant owns it (the same answer)."""
    meta = ds.get(ds_id) if is_dataset_id(ds_id) else None  # never let a path segment name another key
    if meta is None or not caller.owns(meta.get("tenant")):
        raise not_found(ds_id, field)
    return meta


def delete_dataset(ds: DatasetStore, cfg: Settings, ds_id: str, caller: Principal) -> None:
    """Delete the dataset and its file; 409 while a queued or running job trains on it."""
    owned_dataset(ds, ds_id, caller)
    deleted, busy = ds.delete(ds_id)
    if busy:
        raise ApiError(409, "dataset_in_use",
                       f"dataset {ds_id} is used by queued or running job(s) {', '.join(busy[:5])}; "
                       "cancel them or wait for them to end", "id")
    if not deleted:
        raise not_found(ds_id)
    dataset_file(cfg, ds_id).unlink(missing_ok=True)


def rows_of(ds: DatasetStore, cfg: Settings, ds_id: str, caller: Principal,
            field: str = "dataset.id") -> list[dict[str, Any]]:
    """The stored rows of a dataset the caller owns, for the checks before queueing; 404 when there is none."""
    owned_dataset(ds, ds_id, caller, field)
    with dataset_file(cfg, ds_id).open() as f:
        return [json.loads(line) for line in f if line.strip()]


def link_job(ds: DatasetStore, st: JobStore, uploads: list[tuple[str, str]], job_id: str) -> None:
    """Record that the new job uses these uploaded datasets ((field, id) pairs), so none can be deleted under
    it; before enqueueing. One deleted since it was checked fails the job: 404 naming its field."""
    for field, ds_id in uploads:
        if not ds.link_job(ds_id, job_id):
            st.fail(job_id, "dataset_not_found", f"dataset {ds_id} was deleted before the job was queued")
            raise not_found(ds_id, field)
