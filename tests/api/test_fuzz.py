"""Schemathesis against the served OpenAPI schema, with a valid (tenant) key: no 5xx, and every
response's status, content type and body match the schema. Bounded and derandomized, so it runs in
``make test`` like any other test.

The service has keys on and a generate worker but no train worker, so accepted jobs stay queued (the
fuzzer's random hyperparameters never train), and small generate limits keep every generation short.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from tests.keyed import Keyed, keyed_service

MAX_EXAMPLES = 12
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
LIMITS = {"FTAAS_MAX_NEW_TOKENS": "4", "FTAAS_MAX_PROMPTS": "2", "FTAAS_MAX_PROMPT_CHARS": "200",
          "FTAAS_GENERATE_TIMEOUT_S": "120", "FTAAS_MAX_UPLOAD_BYTES": "65536"}


@pytest.fixture(scope="module")
def fuzz_service(service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keyed]:
    with keyed_service(service_env, tmp_path_factory.mktemp("fuzz"), "fuzz", generate=True,
                       extra_env=LIMITS) as svc:
        yield svc


def test_api_matches_its_schema(fuzz_service: Keyed) -> None:
    """Each operation of the schema in turn (hypothesis strategies from schemathesis); every failure is
    collected, so one run names them all."""
    schema = schemathesis.openapi.from_url(f"{fuzz_service.url}/openapi.json")
    failures: list[str] = []
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.path == "/readyz":  # 503 by design here: no train worker (its 503 is documented)
            continue
        operations += 1

        @given(case=operation.as_strategy())
        @settings(max_examples=MAX_EXAMPLES, derandomize=True, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
        def run(case: Any) -> None:
            case.call_and_validate(base_url=fuzz_service.url, headers=fuzz_service.headers("alpha"),
                                   checks=CHECKS, timeout=180)

        try:
            run()
        except (Exception, BaseExceptionGroup) as e:  # the failing example, as schemathesis reports it
            failures.append(f"{operation.label}: {str(e)[:3000]}")
    assert operations >= 20
    assert not failures, "\n\n".join(failures)
