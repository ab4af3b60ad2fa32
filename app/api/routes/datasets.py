"""Uploaded datasets: ``POST /datasets`` (multipart, streamed to disk), list, get and delete
(the work is in app/api/services/datasets.py)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response

from app.api.auth import Caller
from app.api.deps import Config, Datasets
from app.api.schemas import Dataset, DatasetId, DatasetList, ErrorEnvelope
from app.api.services import datasets as service
from app.api.services.datasets import FILE_FIELD

router = APIRouter(tags=["datasets"])

_UPLOAD_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": [FILE_FIELD],
    "properties": {FILE_FIELD: {"type": "string", "format": "binary",
                                "description": "A .jsonl, .json (array of objects), .csv or .parquet file."}},
}}}}}


@router.post("/datasets", status_code=201, response_model=Dataset, openapi_extra=_UPLOAD_BODY,
             responses={s: {"model": ErrorEnvelope} for s in (400, 413, 415, 422)})
async def upload_dataset(request: Request, response: Response, cfg: Config, ds: Datasets,
                         caller: Caller) -> dict[str, Any]:
    """Upload a dataset file (multipart field ``file``); 201 with its id, row count, columns and a preview."""
    meta = await service.upload_dataset(request.stream(), request.headers.get("content-type", ""),
                                        request.headers.get("content-length", ""), cfg, ds, caller)
    response.headers["Location"] = f"/datasets/{meta['id']}"
    return meta


@router.get("/datasets", response_model=DatasetList)
def list_datasets(
    ds: Datasets,
    caller: Caller,
    limit: Annotated[int, Query(ge=1, le=100, description="Page size.")] = 20,
    after: Annotated[DatasetId | None, Query(description="The `next_after` of the previous page.")] = None,
) -> dict[str, Any]:
    items, has_more = ds.page(limit, after, caller.scope)
    return {"data": items, "has_more": has_more, "next_after": items[-1]["id"] if has_more and items else None}


@router.get("/datasets/{dataset_id}", response_model=Dataset)
def get_dataset(dataset_id: str, ds: Datasets, caller: Caller) -> dict[str, Any]:
    return service.owned_dataset(ds, dataset_id, caller)


@router.delete("/datasets/{dataset_id}", status_code=204, response_class=Response,
               responses={409: {"model": ErrorEnvelope}})
def delete_dataset(dataset_id: str, ds: Datasets, cfg: Config, caller: Caller) -> Response:
    """Delete the dataset and its file; 409 while a queued or running job trains on it."""
    service.delete_dataset(ds, cfg, dataset_id, caller)
    return Response(status_code=204)
