"""The Redis stores: the one package that owns every Redis key and every job status transition.

Keys (``P`` is ``settings.redis_prefix``):
  ``P:job:<id>``          hash: status, times, public request, progress, metrics, error, adapter
  ``P:job:<id>:payload``  the full accepted request (inline rows included), read by the worker
  ``P:jobs``              sorted set of every job id (score 0, ordered by id = by creation time)
  ``P:jobs:<status>``     the same, one per status, for filtered listing
  ``P:job:<id>:events``   stream of the job's events (type, time, data), at most EVENTS_MAXLEN
  ``P:job:<id>:metrics``  list of metric points (JSON), one per logging step or evaluation
  ``P:dataset:<id>``      JSON: an uploaded dataset's metadata (its rows are ``<dataset_dir>/<id>.jsonl``)
  ``P:datasets``          sorted set of every dataset id (score 0, ordered by id = by upload time)
  ``P:dataset:<id>:jobs`` set of the ids of jobs that train on the dataset (it cannot be deleted while
                          one of them is queued or running)
  ``P:tenant:<t>:jobs``   sorted set of the ids of tenant ``t``'s jobs (like ``P:jobs``); the job hash's
                          ``tenant`` field names its owner too
  ``P:tenant:<t>:active`` sorted set: ids of ``t``'s jobs counted against its queued + running cap, scored
                          by the time the slot was taken; ended (or never created, after a minute) jobs
                          are dropped from it by the script that takes the next slot
  ``P:tenant:<t>:datasets`` sorted set of the ids of tenant ``t``'s uploaded datasets
  ``P:tenant:<t>:generate:<n>`` counter of ``t``'s generate requests in fixed rate window ``n``
                          (TTL: the window's length)
  ``P:job:<id>:lease``    a running job's lease: the owning worker's token, with a TTL (``lease_ttl_s``)
                          that the worker's heartbeat renews; its absence while the job is ``running``
                          means the worker is gone (see app/core/lease.py). The job hash's ``owner`` field
                          names the attempt that may write (fencing): a worker whose attempt was
                          requeued by the reaper can no longer change the job
  ``P:gen:<id>``          stream of one streamed generate request's events (``token``: output index and
                          new text; then ``done`` with the result or ``error``), written by the generate
                          worker, relayed as SSE by the API (TTL ``GEN_TTL_S``)
  ``P:serving:<worker>``  JSON: what a generate worker has loaded (base models and their adapters),
                          refreshed while it runs (TTL ``SERVING_TTL_S``); read by ``GET /adapters``
  ``P:stats``             hash of service-wide counters (HINCRBY): ``adapter_hits`` and ``adapter_loads``,
                          counted by the generate worker (adapter already cached / loaded from disk)
  ``P:webhook:<id>``      hash: a webhook endpoint (url, its ``whsec_`` signing secret, tenant, created_at)
  ``P:webhooks``          sorted set of every endpoint id (score 0, ordered by id = by creation time)
  ``P:tenant:<t>:webhooks`` set of the ids of tenant ``t``'s endpoints
  ``P:webhooks:outbox``   sorted set of pending deliveries ``<event id>:<endpoint id>``, scored by the
                          time of their next attempt; written by ``_UPDATE`` with a job's terminal status
  ``P:webhooks:delivery:<delivery id>`` hash: the event body sent, endpoint, job, attempts, last error,
                          then ``status`` (``delivered`` | ``given_up`` | ``dropped``; TTL 7 days then)
  ``<K><queue>``          Celery's own list of a queue's waiting messages, plus one per priority 3, 6, 9
                          (the name, kombu's separator, the priority); ``K`` = the broker's
                          ``global_keyprefix`` (``P:celery:``). Written by Celery, only read here

Tenant names (app/core/apikeys.py ``TENANT_PATTERN``) hold no ``:``, so a tenant's keys never collide.
Job and dataset records have no TTL: nothing a user made disappears on its own.
Transitions run as one Lua script (jobs.py ``_UPDATE``), so only legal ones happen, atomically:
  queued -> running | cancelled | failed;  running -> succeeded | failed | cancelled | queued.
running -> queued is a requeue: by the reaper when the lease expired (worker lost) or by the worker
itself when it is stopped with SIGTERM (preempted, after a checkpoint). ``attempts`` counts starts.

Who writes which keys (each store is one module; new keys go into the list above):
  jobs.py         ``JobStore``: ``P:job:<id>`` and its ``:payload``, ``:events``, ``:metrics``, ``:lease``;
                  ``P:jobs``, ``P:jobs:<status>``, ``P:tenant:<t>:jobs``
  tenants.py      ``TenantQuotas`` (a base of JobStore): ``P:tenant:<t>:active``, ``P:tenant:<t>:generate:<n>``
  ops.py          ``OpsCounters`` (a base of JobStore): ``P:stats``; reads the per-status indexes and Celery's lists
  datasets.py     ``DatasetStore``: ``P:dataset:<id>``, ``P:dataset:<id>:jobs``, ``P:datasets``,
                  ``P:tenant:<t>:datasets``
  webhooks.py     ``WebhookStore``: ``P:webhook:<id>``, ``P:webhooks``, ``P:tenant:<t>:webhooks``; claims,
                  reschedules and ends ``P:webhooks:outbox`` entries and their ``:delivery:`` hashes (jobs.py
                  ``_UPDATE`` creates them)
  generations.py  ``GenerationStore``: ``P:gen:<id>``, ``P:serving:<worker>``
  base.py         ``redis_client`` and ``_Store``, the client and key prefix they share
"""

from app.core.ids import new_id, new_job_id
from app.core.store.base import redis_client
from app.core.store.datasets import DatasetStore
from app.core.store.generations import GEN_TTL_S, SERVING_TTL_S, GenerationStore
from app.core.store.jobs import EVENTS_MAXLEN, LEGAL_FROM, METRICS_MAXLEN, JobStore
from app.core.store.ops import OpsCounters
from app.core.store.tenants import TenantQuotas
from app.core.store.webhooks import WebhookStore

__all__ = [
    "EVENTS_MAXLEN",
    "GEN_TTL_S",
    "LEGAL_FROM",
    "METRICS_MAXLEN",
    "SERVING_TTL_S",
    "DatasetStore",
    "GenerationStore",
    "JobStore",
    "OpsCounters",
    "TenantQuotas",
    "WebhookStore",
    "new_id",
    "new_job_id",
    "redis_client",
]
