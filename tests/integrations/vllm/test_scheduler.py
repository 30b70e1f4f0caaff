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
    side = scheduler(lambda tokens, salt, segment: len(tokens) - len(tokens) % CHUNK)
    assert side.num_new_matched_tokens(request("a", 700), 0) == 640
    assert side.num_new_matched_tokens(request("b", 700), 256) == 384  # vLLM already has 256
    assert side.num_new_matched_tokens(request("c", 512), 0) == 511  # a full hit: vLLM computes the last token
    assert side.num_new_matched_tokens(request("d", 100), 0) == 0
    side.close()


def test_a_slow_lookup_answers_not_yet_instead_of_blocking() -> None:
    release = threading.Event()

    def slow(tokens: list[int], salt: str, segment: bool) -> int:
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
    side = scheduler(lambda tokens, salt, segment: release.wait(10) and 256)
    req = request("gone", 300)
    assert side.num_new_matched_tokens(req, 0) is None
    side.finished(req)  # aborted before vLLM asked again
    release.set()
    assert not side._pending and not side._hits and not side._admitted
    side.close()


def test_a_failing_lookup_is_a_miss() -> None:
    def broken(tokens: list[int], salt: str, segment: bool) -> int:
        raise RuntimeError("boom")

    side = scheduler(broken)
    assert side.num_new_matched_tokens(request("x", 300), 0) == 0
    side.close()


class FakeTokenizer:
    """Tokenizes the separator only (the scheduler needs no other text): its ids are 7 7 9."""

    def __call__(self, text: str, add_special_tokens: bool = False):  # type: ignore[no-untyped-def]
        return type("Encoding", (), {"input_ids": [7, 7, 9]})()


def blending_scheduler(cached: dict[tuple[int, ...], int], prefix: int = 0) -> SchedulerSide:
    """A scheduler whose lookups answer from ``cached`` (segment tokens -> cached tokens) and ``prefix``."""
    from kvtier.integrations.segment_io import SegmentFinder

    config = load_config(env={}, overrides={"chunk_size": 16, "enable_blending": True, "blend_min_tokens": 16})

    def lookup(tokens: list[int], salt: str, segment: bool) -> int:
        return cached.get(tuple(tokens), 0) if segment else prefix

    finder = SegmentFinder(config, FakeTokenizer())
    return SchedulerSide(
        config, lookup=lookup, can_load=True, can_save=True, metrics=IntegrationMetrics(), segments=finder
    )


def test_a_prompt_with_a_cached_segment_is_claimed_up_to_its_last_token() -> None:
    """Blending on: one cached segment past the prefix and the scheduler claims every token but the last (the
    worker produces them by blending); with none cached, only the prefix."""
    doc_a, doc_b = list(range(100, 140)), list(range(200, 250))
    prompt = [*doc_a, 7, 7, 9, *doc_b, 7, 7, 9, 1, 2, 3]
    side = blending_scheduler({tuple(doc_b): 48})
    req = Request("blend", prompt, SamplingParams(max_tokens=1), None)
    assert side.num_new_matched_tokens(req, 0) == len(prompt) - 1
    side.after_alloc(req, len(prompt) - 1)
    assert side._admitted["blend"].blend and side._admitted["blend"].hit.first_blended() == 43
    side.close()
    nothing = blending_scheduler({}, prefix=32)
    assert nothing.num_new_matched_tokens(Request("plain", prompt, SamplingParams(max_tokens=1), None), 0) == 32
    nothing.close()
