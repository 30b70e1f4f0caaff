"""Property-based fuzzing of the admin API from its own OpenAPI document (schemathesis): requests built from the
schema and deliberately broken ones, against a real server over real HTTP. No request may get a 5xx, every
answer must be one the document lists, with the body it describes, and invalid input must be refused."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from conftest import InProcessServer

TOKEN = "fuzz-token"
EXAMPLES = 100  # per operation and mode
CASES: Counter[str] = Counter()  # cases tried per operation, reported at the end
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


@pytest.fixture(scope="module")
def admin_server(tmp_path_factory) -> Iterator[InProcessServer]:  # type: ignore[no-untyped-def]
    server = InProcessServer(tmp_path_factory.mktemp("admin-fuzz") / "disk", server_auth_token=TOKEN)
    yield server
    server.stop()
    print(f"\nadmin API fuzzing: {sum(CASES.values())} cases over {len(CASES)} operations: {dict(CASES)}")


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(GenerationMode), ids=[m.value for m in GenerationMode])
def test_the_admin_api_survives_its_own_schema_and_broken_variants(admin_server, mode) -> None:  # type: ignore[no-untyped-def]
    """For every operation: valid requests (positive) and requests that break the schema (negative)."""
    base = f"http://127.0.0.1:{admin_server.http_port}"
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10
    for operation in operations:

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy(generation_mode=mode))
        def check(case) -> None:  # type: ignore[no-untyped-def]
            CASES[f"{mode.value} {case.method} {case.path}"] += 1
            case.call_and_validate(base_url=base, headers={"Authorization": f"Bearer {TOKEN}"}, checks=CHECKS)

        try:
            check()
        except Unsatisfiable:  # nothing to break in an operation without parameters or body (GET /status)
            assert mode is GenerationMode.NEGATIVE
    assert admin_server.thread.is_alive()
