"""Dataset uploads: the parsers alone (app/api/uploads.py), then POST/GET/DELETE /datasets and jobs on an
uploaded dataset against the running service (real API, Redis and workers)."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import redis

from app.api import uploads
from app.api.errors import ApiError
from app.api.schemas import DatasetFormat
from app.api.uploads import detect_file_format, normalise
from app.core import paths as storage
from app.core.settings import Settings
from app.core.store import DatasetStore, JobStore, new_id, new_job_id
from tests.conftest import TERMINAL, assert_error, wait_for

QUOTES = [{"quote": "Be yourself.", "author": "Oscar Wilde"}, {"quote": "Stay hungry.", "author": "Steve Jobs"},
          {"quote": "Less is more.", "author": "Mies"}]
UPLOAD_LIMIT = 2 * 1024 * 1024  # FTAAS_MAX_UPLOAD_BYTES in conftest's service_env


def jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def parquet(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def csv_bytes(rows: list[dict[str, Any]]) -> bytes:
    return ("quote,author\n" + "".join(f'"{r["quote"]}",{r["author"]}\n' for r in rows)).encode()


# -- the parsers alone -----------------------------------------------------------------------------------

def run_normalise(tmp_path: Path, content: bytes, fmt: DatasetFormat) -> tuple[uploads.Summary, list[Any]]:
    src, dest = tmp_path / "upload", tmp_path / "out.jsonl"
    src.write_bytes(content)
    summary = normalise(src, fmt, dest)
    return summary, [json.loads(line) for line in dest.read_text().splitlines()]


@pytest.mark.parametrize(("fmt", "content"), [
    ("jsonl", b'\xef\xbb\xbf{"quote": "Be yourself.", "author": "Oscar Wilde"}\n\n'
              + jsonl(QUOTES[1:]).replace(b"\n", b"\r\n")),
    ("json", json.dumps(QUOTES, indent=2).encode()),
    ("csv", csv_bytes(QUOTES)),
    ("parquet", parquet(pa.Table.from_pylist(QUOTES))),
])
def test_normalise_each_format(tmp_path: Path, fmt: DatasetFormat, content: bytes) -> None:
    summary, rows = run_normalise(tmp_path, content, fmt)
    assert rows == QUOTES and summary.row_count == 3 and summary.dropped_rows == 0
    assert summary.columns == {"quote", "author"} and summary.preview == QUOTES


def test_normalise_keeps_values_and_messages(tmp_path: Path) -> None:
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    table = pa.table({"messages": [chat, None], "n": [1.5, float("nan")], "ok": [True, None], "k": [3, 4]})
    summary, rows = run_normalise(tmp_path, parquet(table), "parquet")
    assert rows == [{"messages": chat, "n": 1.5, "ok": True, "k": 3}, {"messages": None, "n": None, "ok": None, "k": 4}]
    assert summary.columns == {"messages", "n", "ok", "k"}

    content = jsonl([{"text": "x" * 5000, "id": 1}, {"text": ""}, {"text": None, "id": None}, {"text": "b", "x": 2}])
    summary, rows = run_normalise(tmp_path, content, "jsonl")
    assert summary.row_count == 2 and summary.dropped_rows == 2 and summary.columns == {"text", "id", "x"}
    assert rows[0]["text"] == "x" * 5000  # stored as is; the preview is shortened
    assert summary.preview[0]["text"] == "x" * uploads.PREVIEW_CHARS + "…"


def test_normalise_preview_is_first_five_rows(tmp_path: Path) -> None:
    summary, rows = run_normalise(tmp_path, jsonl([{"i": i} for i in range(12)]), "jsonl")
    assert summary.row_count == 12 and len(rows) == 12
    assert summary.preview == [{"i": i} for i in range(5)]


def test_json_array_is_streamed_across_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(uploads, "_CHUNK_CHARS", 7)  # every element, number and string crosses a chunk edge
    rows = [{"i": i * 1234567, "s": "é" * (i % 5), "f": i / 3} for i in range(200)]
    summary, stored = run_normalise(tmp_path, json.dumps(rows, indent=1).encode(), "json")
    assert stored == rows and summary.row_count == 200
    bad = "[\n" + ",\n".join(json.dumps(r) for r in rows[:40]) + ",\n{\"a\": tru}\n]"
    with pytest.raises(ApiError) as e:
        run_normalise(tmp_path, bad.encode(), "json")
    assert "line 42" in e.value.message and not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize(("fmt", "content", "code", "fragment"), [
    ("jsonl", b'{"a": 1}\n{"a": 2}\nnot json\n{"a": 3}\n\n{"a": 4}\n[1, 2]\n', "invalid_dataset", "lines 3, 7:"),
    ("jsonl", b'{"a": 1}\n{"a": {"nested": 1}}\n', "invalid_dataset", "line 2: column 'a' holds an object"),
    ("jsonl", b'{"messages": [{"role": "robot", "content": "x"}]}\n', "invalid_dataset", "line 1: 'messages'"),
    ("jsonl", b'{"a": 1}\n\xff\xfe\n', "invalid_dataset", "line 2:"),
    ("jsonl", b"\n".join([b"nope"] * 9), "invalid_dataset", "(and 4 more bad lines)"),
    ("jsonl", b"", "empty_dataset", "empty"),
    ("jsonl", b"\n\n  \n", "empty_dataset", "no rows"),
    ("jsonl", b'{"a": ""}\n{"a": null}\n', "empty_dataset", "all 2 rows are empty"),
    ("json", b'{"a": 1}', "invalid_dataset", "array of objects"),
    ("json", b'[{"a": 1},\n 2,\n "x"]', "invalid_dataset", "array element 2: a number, not an object"),
    ("json", b'[{"a": 1},\n{"a": 2}\n{"a": 3}]', "invalid_dataset", "line 3: expecting ','"),
    ("json", b'[{"a": 1}] trailing', "invalid_dataset", "extra data"),
    ("json", b"[]", "empty_dataset", "no rows"),
    ("csv", b"quote,author\nA,B\nC\nD,E\n", "invalid_dataset", "line 3: fewer fields than the header's 2"),
    ("csv", b"quote,author\nA,B,C\n", "invalid_dataset", "line 2: more fields"),
    ("csv", b"quote,quote\nA,B\n", "invalid_dataset", "names 'quote' twice"),
    ("csv", b"quote,\nA,B\n", "invalid_dataset", "header column 2"),
    ("csv", b"quote,author\n\xff,B\n", "invalid_dataset", "not UTF-8"),
    ("csv", b"quote,author\n", "empty_dataset", "no rows"),
    ("csv", b"quote,author\n,\n , \n", "empty_dataset", "all 2 rows are empty"),
    ("parquet", b"PAR1 not really", "invalid_dataset", "Parquet"),
])
def test_normalise_rejects(tmp_path: Path, fmt: DatasetFormat, content: bytes, code: str, fragment: str) -> None:
    with pytest.raises(ApiError) as e:
        run_normalise(tmp_path, content, fmt)
    assert (e.value.status, e.value.code, e.value.field) == (422, code, "file")
    assert fragment in e.value.message, e.value.message
    assert not (tmp_path / "out.jsonl").exists()


def test_parquet_unsupported_type_names_column(tmp_path: Path) -> None:
    table = pa.table({"text": ["a"], "blob": pa.array([b"\x00"], pa.binary())})
    with pytest.raises(ApiError) as e:
        run_normalise(tmp_path, parquet(table), "parquet")
    assert "row 1: column 'blob' holds a value of type bytes" in e.value.message


@pytest.mark.parametrize(("filename", "content_type", "expected"), [
    ("q.jsonl", None, "jsonl"), ("Q.JSONL", "application/x-ndjson", "jsonl"), ("a/b.json", "application/json", "json"),
    ("q.csv", "text/csv; charset=utf-8", "csv"), ("q.csv", "application/vnd.ms-excel", "csv"),
    ("q.parquet", "application/octet-stream", "parquet"), ("q.parquet", "application/vnd.apache.parquet", "parquet"),
])
def test_detect_file_format(filename: str, content_type: str | None, expected: str) -> None:
    assert detect_file_format(filename, content_type) == expected


@pytest.mark.parametrize(("filename", "content_type"), [
    ("q.txt", None), ("q", None), (None, "application/json"), ("q.jsonl.exe", None), ("q.csv", "image/png"),
    ("q.parquet", "text/csv"), ("q.json", "text/csv"),
])
def test_detect_file_format_rejects(filename: str | None, content_type: str | None) -> None:
    with pytest.raises(ApiError) as e:
        detect_file_format(filename, content_type)
    assert (e.value.status, e.value.code, e.value.field) == (415, "unsupported_media_type", "file")


def test_dataset_file_takes_only_ids(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    assert storage.dataset_file(settings, "ds_" + "0" * 22) == tmp_path / "datasets" / f"ds_{'0' * 22}.jsonl"
    for bad in ("../../etc/passwd", "ds_" + "0" * 21 + "/", "ds_x", ""):
        with pytest.raises(ValueError):
            storage.dataset_file(settings, bad)


def test_dataset_store_links_jobs_and_refuses_delete(redis_url: str, unit_prefix: str, store: JobStore) -> None:
    ds = DatasetStore.from_url(redis_url, unit_prefix)
    ds_id, job_id = new_id("ds"), new_job_id()
    assert not ds.link_job(ds_id, job_id)  # no such dataset (e.g. deleted between check and link)
    ds.create(ds_id, {"id": ds_id})
    store.create(job_id, {"name": None}, {}, 1)
    assert ds.link_job(ds_id, job_id)
    assert ds.delete(ds_id) == (False, [job_id])
    assert ds.get(ds_id) == {"id": ds_id}
    store.request_cancel(job_id)
    assert ds.delete(ds_id) == (True, [])
    assert ds.get(ds_id) is None and ds.delete(ds_id) == (False, [])
    assert not ds.r.exists(f"{unit_prefix}:dataset:{ds_id}:jobs")
    assert ds_id not in ds.r.zrange(f"{unit_prefix}:datasets", 0, -1)
    assert not ds.link_job(ds_id, job_id)


# -- over HTTP -------------------------------------------------------------------------------------------

def upload(client: httpx.Client, filename: str, content: bytes, content_type: str | None = None) -> httpx.Response:
    file = (filename, content, content_type) if content_type else (filename, content)
    return client.post("/datasets", files={"file": file})


@pytest.fixture
def nothing_left(data_dir: Path, redis_url: str, prefix: str) -> Iterator[None]:
    """The dataset store (folder and Redis) is the same after the test as before it."""
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    folder = data_dir / "datasets"

    def state() -> tuple[set[str], set[str], set[str]]:
        files = {p.name for p in folder.iterdir()} if folder.exists() else set()
        return files, set(r.scan_iter(f"{prefix}:dataset:*")), set(r.zrange(f"{prefix}:datasets", 0, -1))

    before = state()
    yield
    assert state() == before


@pytest.mark.parametrize(("filename", "content", "content_type"), [
    ("quotes.jsonl", jsonl(QUOTES), "application/jsonl"),
    ("quotes.json", json.dumps(QUOTES).encode(), "application/json"),
    ("quotes.csv", csv_bytes(QUOTES), "text/csv"),
    ("quotes.parquet", parquet(pa.Table.from_pylist(QUOTES)), None),
])
def test_upload_each_format(client: httpx.Client, data_dir: Path, filename: str, content: bytes,
                            content_type: str | None) -> None:
    resp = upload(client, filename, content, content_type)
    assert resp.status_code == 201, resp.text
    ds = resp.json()
    assert resp.headers["location"] == f"/datasets/{ds['id']}"
    assert ds["id"].startswith("ds_") and len(ds["id"]) == 25 and ds["object"] == "dataset"
    assert ds["filename"] == filename and ds["format"] == filename.rsplit(".", 1)[1]
    assert ds["row_count"] == 3 and ds["columns"] == ["author", "quote"] and ds["bytes"] == len(content)
    assert ds["preview"] == QUOTES and ds["dropped_rows"] == 0 and ds["created_at"] > 0
    stored = data_dir / "datasets" / f"{ds['id']}.jsonl"
    assert [json.loads(line) for line in stored.read_text().splitlines()] == QUOTES
    assert client.get(f"/datasets/{ds['id']}").json() == ds


def test_user_filename_never_becomes_a_path(client: httpx.Client, data_dir: Path) -> None:
    folder = data_dir / "datasets"
    before = set(folder.iterdir()) if folder.exists() else set()
    resp = upload(client, "../../evil name.jsonl", jsonl(QUOTES))
    assert resp.status_code == 201, resp.text
    assert resp.json()["filename"] == "../../evil name.jsonl"
    assert set(folder.iterdir()) - before == {folder / f"{resp.json()['id']}.jsonl"}


@pytest.mark.usefixtures("nothing_left")
@pytest.mark.parametrize(("filename", "content", "content_type", "status", "code", "fragment"), [
    ("bad.jsonl", b'{"a": 1}\n{"a": 2}\n{oops\n{"a": 3}\n{"a": 4}\n{"a": 5}\n"str"\n', None, 422, "invalid_dataset",
     "lines 3, 7"),
    ("bad.json", b'{"quote": "not an array"}', None, 422, "invalid_dataset", "array of objects"),
    ("bad.json", b'[{"quote": "a"}, "b"]', None, 422, "invalid_dataset", "array element 2"),
    ("bad.csv", b"quote,author\nA,B\nC\n", "text/csv", 422, "invalid_dataset", "line 3"),
    ("empty.jsonl", b"", None, 422, "empty_dataset", "empty"),
    ("blank.csv", b"quote,author\n,\n", None, 422, "empty_dataset", "no usable rows"),
    ("bad.parquet", b"PAR1garbagePAR1", None, 422, "invalid_dataset", "Parquet"),
    ("quotes.txt", jsonl(QUOTES), None, 415, "unsupported_media_type", ".jsonl"),
    ("quotes.jsonl", jsonl(QUOTES), "image/png", 415, "unsupported_media_type", "image/png"),
])
def test_malformed_upload_leaves_nothing(client: httpx.Client, filename: str, content: bytes,
                                         content_type: str | None, status: int, code: str, fragment: str) -> None:
    err = assert_error(upload(client, filename, content, content_type), status, code, "file")
    assert fragment in err["message"], err


@pytest.mark.usefixtures("nothing_left")
def test_upload_request_shape(client: httpx.Client) -> None:
    assert_error(client.post("/datasets", json=QUOTES), 415, "unsupported_media_type")
    assert_error(client.post("/datasets", files={"data": ("q.jsonl", jsonl(QUOTES))}), 422, "invalid_request", "file")
    two = [("file", ("a.jsonl", jsonl(QUOTES))), ("file", ("b.jsonl", jsonl(QUOTES)))]
    assert_error(client.post("/datasets", files=two), 422, "invalid_request", "file")
    multipart = {"content-type": "multipart/form-data; boundary=B"}
    assert_error(client.post("/datasets", content=b"garbage", headers=multipart), 400, "invalid_multipart")
    truncated = b'--B\r\nContent-Disposition: form-data; name="file"; filename="q.jsonl"\r\n\r\n' + jsonl(QUOTES)
    assert_error(client.post("/datasets", content=truncated, headers=multipart), 400, "invalid_multipart")


@pytest.mark.usefixtures("nothing_left")
def test_oversize_upload_is_413(client: httpx.Client) -> None:
    line = jsonl([{"text": "x" * 1000}])
    big = line * (UPLOAD_LIMIT // len(line) + 100)
    err = assert_error(upload(client, "big.jsonl", big), 413, "payload_too_large", "file")
    assert f"{UPLOAD_LIMIT:,}" in err["message"]

    def chunked() -> Iterator[bytes]:  # no Content-Length: the limit is enforced while streaming
        yield b'--B\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n\r\n'
        for _ in range(UPLOAD_LIMIT // len(line) + 100):
            yield line
        yield b"\r\n--B--\r\n"

    resp = client.post("/datasets", content=chunked(), headers={"content-type": "multipart/form-data; boundary=B"})
    assert_error(resp, 413, "payload_too_large", "file")
    # just under the limit is fine
    ok = upload(client, "fits.jsonl", line * (UPLOAD_LIMIT // len(line) - 1))
    assert ok.status_code == 201, ok.text
    assert client.delete(f"/datasets/{ok.json()['id']}").status_code == 204


def test_list_get_delete(client: httpx.Client, data_dir: Path) -> None:
    ids = [upload(client, f"q{i}.jsonl", jsonl(QUOTES[: i + 1])).json()["id"] for i in range(3)]
    first = client.get("/datasets", params={"limit": 2}).json()
    assert [d["id"] for d in first["data"]] == ids[::-1][:2] and first["has_more"] and first["next_after"] == ids[1]
    rest = client.get("/datasets", params={"limit": 100, "after": first["next_after"]}).json()
    assert rest["data"][0]["id"] == ids[0] and ids[1] not in [d["id"] for d in rest["data"]]
    assert client.get(f"/datasets/{ids[2]}").json()["row_count"] == 3

    assert client.delete(f"/datasets/{ids[0]}").status_code == 204
    assert not (data_dir / "datasets" / f"{ids[0]}.jsonl").exists()
    assert_error(client.get(f"/datasets/{ids[0]}"), 404, "dataset_not_found", "id")
    assert_error(client.delete(f"/datasets/{ids[0]}"), 404, "dataset_not_found", "id")
    assert ids[0] not in [d["id"] for d in client.get("/datasets", params={"limit": 100}).json()["data"]]
    assert_error(client.get("/datasets/../../etc/passwd"), 404)
    assert_error(client.delete("/datasets/ds_x"), 404, "dataset_not_found", "id")
    assert_error(client.get("/datasets", params={"after": "../x"}), 422, "invalid_request", "after")
    assert_error(client.get("/datasets", params={"limit": 0}), 422, "invalid_request", "limit")


def tiny_dataset_job(ds_id: str, **extra: Any) -> dict[str, Any]:
    hp = {"max_steps": 3, "batch_size": 2, "gradient_accumulation_steps": 1, "max_length": 64,
          "gradient_checkpointing": False, "seed": 7}
    return {"base_model": "tiny-gemma", "dataset": {"id": ds_id}, "hyperparameters": hp} | extra


def test_delete_is_refused_while_a_job_uses_it(client: httpx.Client, quotes: list[dict[str, Any]]) -> None:
    ds_id = upload(client, "quotes.jsonl", jsonl(quotes[:16])).json()["id"]
    body = tiny_dataset_job(ds_id)
    body["hyperparameters"]["max_steps"] = 5000
    resp = client.post("/jobs", json=body)
    assert resp.status_code == 202, resp.text
    job = resp.json()
    assert job["request"]["dataset"] == {"id": ds_id}

    err = assert_error(client.delete(f"/datasets/{ds_id}"), 409, "dataset_in_use")  # queued (or already running)
    assert job["id"] in err["message"]
    assert_error(client.get(f"/datasets/{ds_id}:jobs"), 404, "dataset_not_found")  # never another Redis key
    assert_error(client.delete(f"/datasets/{ds_id}:jobs"), 404, "dataset_not_found")
    wait_for(client, job["id"], {"running"})
    assert_error(client.delete(f"/datasets/{ds_id}"), 409, "dataset_in_use")
    assert client.get(f"/datasets/{ds_id}").status_code == 200

    assert client.post(f"/jobs/{job['id']}/cancel").status_code == 202
    assert wait_for(client, job["id"], TERMINAL)["status"] == "cancelled"
    assert client.delete(f"/datasets/{ds_id}").status_code == 204


def test_job_dataset_id_checks(client: httpx.Client) -> None:
    unknown = "ds_" + "0" * 22
    assert_error(client.post("/jobs", json=tiny_dataset_job(unknown)), 404, "dataset_not_found", "dataset.id")
    assert_error(client.post("/jobs", json=tiny_dataset_job("../etc")), 422, "invalid_request", "dataset.id")
    both = tiny_dataset_job(unknown) | {"dataset": {"id": unknown, "rows": QUOTES}}
    assert_error(client.post("/jobs", json=both), 422, "invalid_request", "dataset")

    ds_id = upload(client, "texts.csv", b"text,label\nhello,1\n").json()["id"]
    err = assert_error(client.post("/jobs", json=tiny_dataset_job(ds_id, template="{text} {quote}")), 422,
                       "template_field_missing", "template")
    assert "'quote'" in err["message"] and ds_id in err["message"]
    assert client.delete(f"/datasets/{ds_id}").status_code == 204  # no job was created, so none holds it


def test_jobs_train_on_uploaded_chat_and_prompt_completion_sets(client: httpx.Client) -> None:
    """Uploaded sets in the non-template formats train to `succeeded` with the format detected."""
    chat = [{"messages": [{"role": "user", "content": f"Count to {i}."},
                          {"role": "assistant", "content": " ".join(map(str, range(1, i + 2)))}]} for i in range(6)]
    pairs = [{"prompt": f"{i} + {i} =", "completion": f" {2 * i}"} for i in range(6)] + [{"prompt": "dropped"}]
    for rows, fmt in ((chat, "messages"), (pairs, "prompt_completion")):
        ds = upload(client, "set.jsonl", jsonl(rows)).json()
        job = client.post("/jobs", json={"base_model": "tiny-gemma", "dataset": {"id": ds["id"]}, "hyperparameters": {
            "max_steps": 2, "batch_size": 2, "gradient_accumulation_steps": 1, "gradient_checkpointing": False}})
        assert job.status_code == 202, job.text
        assert job.json()["dataset_stats"]["format"] == fmt
        done = wait_for(client, job.json()["id"])
        assert done["status"] == "succeeded", done["error"]
        stats = done["dataset_stats"]
        assert stats["format"] == fmt and stats["train_rows"] == 6 and stats["tokens"]["max"] > 0
        if fmt == "prompt_completion":
            assert stats["rows_dropped"] == {"missing field 'completion'": 1}
        assert len(done["evaluation"]["samples"]) == 3
