"""The scheduler half of the connector on real vLLM ``Request`` objects: what it claims, and that a slow lookup
never blocks vLLM's scheduler (it answers "not yet" and is asked again at the next step)."""

from __future__ import annotations

import threading
import time

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed")

from vllm import SamplingParams
from vllm.v1.request import Request

from kvtier import load_config
from kvtier.integrations.vllm.scheduler import INLINE_LOOKUP_SEC, SchedulerSide
from kvtier.metrics import IntegrationMetrics

CHUNK = 128


def request(req_id: str, num_tokens: int) -> Request:
    return Request(req_id, list(range(num_tokens)), SamplingParams(max_tokens=1), None)


def scheduler(lookup) -> SchedulerSide:  # type: ignore[no-untyped-def]
    config = load_config(env={}, overrides={"chunk_size": CHUNK})
    return SchedulerSide(config, lookup=lookup, can_load=True, can_save=True, metrics=IntegrationMetrics())


def test_claims_the_hit_beyond_vllms_own_cache_but_never_the_last_token() -> None:
    side = scheduler(lambda tokens, salt: len(tokens) - len(tokens) % CHUNK)
    assert side.num_new_matched_tokens(request("a", 700), 0) == 640
    assert side.num_new_matched_tokens(request("b", 700), 256) == 384  # vLLM already has 256
    assert side.num_new_matched_tokens(request("c", 512), 0) == 511  # a full hit: vLLM computes the last token
    assert side.num_new_matched_tokens(request("d", 100), 0) == 0
    side.close()


def test_a_slow_lookup_answers_not_yet_instead_of_blocking() -> None:
    release = threading.Event()

    def slow(tokens: list[int], salt: str) -> int:
        release.wait(10)
        return 512

    side = scheduler(slow)
    req = request("slow", 600)
    started = time.perf_counter()
    assert side.num_new_matched_tokens(req, 0) is None  # vLLM skips it this step and schedules others
    assert side.num_new_matched_tokens(req, 0) is None
    assert time.perf_counter() - started < 10 * INLINE_LOOKUP_SEC + 0.5
    release.set()
    deadline = time.monotonic() + 5
    while (claimed := side.num_new_matched_tokens(req, 0)) is None and time.monotonic() < deadline:
        pass
    assert claimed == 512
    side.close()


def test_a_request_finished_while_its_lookup_runs_leaves_nothing_behind() -> None:
    release = threading.Event()
    side = scheduler(lambda tokens, salt: release.wait(10) and 256)
    req = request("gone", 300)
    assert side.num_new_matched_tokens(req, 0) is None
    side.finished(req)  # aborted before vLLM asked again
    release.set()
    assert not side._pending and not side._hits and not side._admitted
    side.close()


def test_a_failing_lookup_is_a_miss() -> None:
    def broken(tokens: list[int], salt: str) -> int:
        raise RuntimeError("boom")

    side = scheduler(broken)
    assert side.num_new_matched_tokens(request("x", 300), 0) == 0
    side.close()
