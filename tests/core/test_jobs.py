"""The typed contract between the API and the workers (app/core/jobs.py): a job's ``JobSpec`` and a generate
request's ``GenerateTask``, each versioned so that a worker of one release never runs a message of another: it
fails the job, or answers the request at once, with a clear code. The last test sends such messages to the real
generate worker of the shared service."""

from __future__ import annotations

import secrets
import time
from typing import Any

import httpx
import pytest
import redis
from celery import Celery

from app.core.errors import UserFacingError
from app.core.jobs import SPEC_VERSION, TASK_VERSION, GenerateTask, JobCreate, JobSpec
from app.core.queue import GENERATE_QUEUE, GENERATE_TASK
from app.core.store import GenerationStore

ROWS = [{"quote": "Be yourself.", "author": "Oscar Wilde"}]


def _spec(**body: Any) -> JobSpec:
    return JobSpec.from_request(JobCreate.model_validate({"dataset": {"rows": ROWS}} | body), "tiny-gemma", 11)


def test_a_spec_resolves_what_the_api_decides_and_round_trips() -> None:
    spec = _spec(template="{quote}")
    assert (spec.base_model, spec.template_given, spec.hyperparameters.seed) == ("tiny-gemma", True, 11)
    assert _spec(hyperparameters={"seed": 5}).hyperparameters.seed == 5 and not _spec().template_given
    stored = spec.model_dump(mode="json")
    assert stored["spec_version"] == SPEC_VERSION and JobSpec.read(stored) == spec
    with pytest.raises(Exception, match="frozen"):
        spec.base_model = "gemma-3-270m"  # type: ignore[misc]
    assert "spec_version" not in spec.public() and spec.public()["dataset"] == {"rows": {"count": 1}}


def test_a_record_from_before_the_version_field_reads_as_version_1() -> None:
    stored = _spec().model_dump(mode="json")
    del stored["spec_version"]
    assert JobSpec.read(stored).spec_version == 1


@pytest.mark.parametrize(("change", "code"), [
    ({"spec_version": SPEC_VERSION + 1}, "unsupported_spec"),
    ({"spec_version": "2"}, "unsupported_spec"),
    ({"a_field_of_a_later_release": 1}, "invalid_spec"),
    ({"dataset": {"hub": {"name": "data"}}}, "invalid_spec"),  # a stored name is checked again, as a path
])
def test_a_spec_this_worker_cannot_read_fails_with_a_clear_code(change: dict[str, Any], code: str) -> None:
    with pytest.raises(UserFacingError) as err:
        JobSpec.read(_spec().model_dump(mode="json") | change)
    assert err.value.code == code and err.value.message


def _task(**fields: Any) -> dict[str, Any]:
    base = {"gen_id": f"gen_{secrets.token_hex(11)}", "stream": False, "enqueued_at": time.time(),
            "prompts": ["Quote:"], "adapter": None, "base_model": "tiny-gemma", "quantization": "nf4",
            "max_new_tokens": 2, "do_sample": False, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "seed": None,
            "stop": []}
    return base | fields


def test_generate_tasks_are_versioned_and_other_releases_are_named() -> None:
    message = _task()
    task = GenerateTask.read(message)
    assert task.task_version == TASK_VERSION and "gen_id" not in task.engine_request()
    assert GenerateTask.stream_of(message) == message["gen_id"]
    for bad, why in (({**message, "task_version": TASK_VERSION + 1}, "version 2"),
                     ({**message, "new_field": 1}, "does not read")):
        with pytest.raises(UserFacingError, match=why) as err:
            GenerateTask.read(bad)
        assert err.value.code == "unsupported_task"
    legacy = ({"prompts": ["Quote:"]}, time.time(), message["gen_id"], False)  # the pre-contract positional form
    with pytest.raises(UserFacingError, match="legacy"):
        GenerateTask.read(*legacy)
    assert GenerateTask.stream_of(*legacy) == message["gen_id"]
    assert GenerateTask.stream_of({"gen_id": "../x"}) is None


def test_generate_options_have_defaults_so_earlier_messages_still_read() -> None:
    """n, logprobs and echo came after TASK_VERSION 1 with defaults: a message without them reads as before, and
    the engine gets them; max_new_tokens 0 is only for echo."""
    old = GenerateTask.read(_task())
    assert (old.n, old.logprobs, old.echo) == (1, None, False)
    assert {"n": 1, "logprobs": None, "echo": False}.items() <= old.engine_request().items()
    scored = GenerateTask.read(_task(n=3, logprobs=5, echo=True, max_new_tokens=0))
    assert scored.engine_request()["n"] == 3 and scored.engine_request()["max_new_tokens"] == 0
    for bad, where in (({"max_new_tokens": 0}, "max_new_tokens may be 0 only with echo"), ({"n": 0}, "n:"),
                       ({"logprobs": 21}, "logprobs:")):
        with pytest.raises(UserFacingError, match=where) as err:
            GenerateTask.read(_task(**bad))
        assert err.value.code == "unsupported_task"


def test_the_generate_worker_answers_another_release_at_once(client: httpx.Client, service_env: dict[str, str]) -> None:
    """A message of another release reaches the real worker: its stream gets ``unsupported_task`` right away
    (the API would answer it in well under its generate timeout), and a current message still works."""
    app = Celery("ftaas-test", broker=service_env["FTAAS_REDIS_URL"])
    app.conf.broker_transport_options = {"global_keyprefix": f"{service_env['FTAAS_REDIS_PREFIX']}:celery:"}
    gens = GenerationStore(redis.Redis.from_url(service_env["FTAAS_REDIS_URL"], decode_responses=True),
                           service_env["FTAAS_REDIS_PREFIX"])
    newer, legacy, current = _task(task_version=TASK_VERSION + 1), _task(), _task()
    try:
        app.send_task(GENERATE_TASK, args=[newer], queue=GENERATE_QUEUE)
        app.send_task(GENERATE_TASK, args=[{"prompts": ["Quote:"]}, time.time(), legacy["gen_id"], False],
                      queue=GENERATE_QUEUE)
        app.send_task(GENERATE_TASK, args=[current], queue=GENERATE_QUEUE)
    finally:
        app.close()
    answers: dict[str, tuple[str, dict[str, Any]]] = {}
    deadline = time.monotonic() + 120
    while len(answers) < 3 and time.monotonic() < deadline:
        for message in (newer, legacy, current):
            for _, kind, data in gens.read(message["gen_id"], "0-0", block_ms=200):
                if kind in ("done", "error"):
                    answers[message["gen_id"]] = (kind, data)
    assert answers[newer["gen_id"]][0] == "error" and answers[newer["gen_id"]][1]["code"] == "unsupported_task"
    assert answers[legacy["gen_id"]][1]["code"] == "unsupported_task", answers
    assert answers[current["gen_id"]][0] == "done", answers
