"""The scheduler half of the connector on real vLLM ``Request`` objects: what it claims, and that a slow lookup
never blocks vLLM's scheduler (it answers "not yet" and is asked again at the next step)."""

from __future__ import annotations

import threading
import time

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed")

from vllm import SamplingParams
from vllm.v1.request import Request, RequestStatus

from kvtier import load_config
from kvtier.integrations.vllm.scheduler import INLINE_LOOKUP_SEC, SchedulerSide
from kvtier.metrics import IntegrationMetrics

CHUNK = 128


def request(req_id: str, num_tokens: int) -> Request:
    return Request(req_id, list(range(num_tokens)), SamplingParams(max_tokens=1), None)


def scheduler(lookup, *, can_load: bool = True, can_save: bool = True, **settings) -> SchedulerSide:  # type: ignore[no-untyped-def]
    config = load_config(env={}, overrides={"chunk_size": CHUNK, **settings})
    return SchedulerSide(config, lookup=lookup, can_load=can_load, can_save=can_save, metrics=IntegrationMetrics())


def handed_off(req_id: str, num_tokens: int, params: object) -> Request:
    """A decoder's request, as a disaggregation proxy sends it: with its prefiller's ``kv_transfer_params``."""
    sampling = SamplingParams(max_tokens=1, extra_args={"kv_transfer_params": params})
    return Request(req_id, list(range(num_tokens)), sampling, None)


def test_claims_the_hit_beyond_vllms_own_cache_but_never_the_last_token() -> None:
    side = scheduler(lambda tokens, salt, segment: len(tokens) - len(tokens) % CHUNK)
    assert side.num_new_matched_tokens(request("a", 700), 0) == (640, False)
    assert side.num_new_matched_tokens(request("b", 700), 256) == (384, False)  # vLLM already has 256
    assert side.num_new_matched_tokens(request("c", 512), 0) == (511, False)  # a full hit: vLLM computes the last
    assert side.num_new_matched_tokens(request("d", 100), 0) == (0, False)
    side.close()


def test_a_slow_lookup_answers_not_yet_instead_of_blocking() -> None:
    release = threading.Event()

    def slow(tokens: list[int], salt: str, segment: bool) -> int:
        release.wait(10)
        return 512

    side = scheduler(slow)
    req = request("slow", 600)
    started = time.perf_counter()
    assert side.num_new_matched_tokens(req, 0) == (None, False)  # vLLM skips it this step and schedules others
    assert side.num_new_matched_tokens(req, 0) == (None, False)
    assert time.perf_counter() - started < 10 * INLINE_LOOKUP_SEC + 0.5
    release.set()
    deadline = time.monotonic() + 5
    while (claimed := side.num_new_matched_tokens(req, 0)[0]) is None and time.monotonic() < deadline:
        pass
    assert claimed == 512
    side.close()


def test_a_request_finished_while_its_lookup_runs_leaves_nothing_behind() -> None:
    release = threading.Event()
    side = scheduler(lambda tokens, salt, segment: release.wait(10) and 256)
    req = request("gone", 300)
    assert side.num_new_matched_tokens(req, 0) == (None, False)
    assert side.finished(req, []) == (False, None)  # aborted before vLLM asked again
    release.set()
    assert not side._pending and not side._matches and not side._admitted
    side.close()


def test_a_failing_lookup_is_a_miss() -> None:
    def broken(tokens: list[int], salt: str, segment: bool) -> int:
        raise RuntimeError("boom")

    side = scheduler(broken)
    assert side.num_new_matched_tokens(request("x", 300), 0) == (0, False)
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
    assert side.num_new_matched_tokens(req, 0) == (len(prompt) - 1, False)  # blending runs in the step
    side.after_alloc(req, len(prompt) - 1)
    assert side._admitted["blend"].blend and side._admitted["blend"].hit.first_blended() == 43
    side.close()
    nothing = blending_scheduler({}, prefix=32)
    plain = Request("plain", prompt, SamplingParams(max_tokens=1), None)
    assert nothing.num_new_matched_tokens(plain, 0) == (32, False)
    nothing.close()


def test_asynchronous_loading_is_asked_for_hits_only() -> None:
    side = scheduler(lambda tokens, salt, segment: 256, enable_async_loading=True)
    assert side.num_new_matched_tokens(request("hit", 300), 0) == (256, True)
    assert side.num_new_matched_tokens(request("mine", 300), 256) == (0, False)  # vLLM has it all: nothing to load
    side.close()


def test_the_allocation_after_an_off_step_load_keeps_what_the_admission_knew() -> None:
    """vLLM allocates again for a request whose off-step load is done, without asking for matched tokens: the
    request is not new (no second count, no store of what the cache has)."""
    side = scheduler(lambda tokens, salt, segment: 256, enable_async_loading=True, save_decode_cache=True)
    req = request("parked", 700)
    assert side.num_new_matched_tokens(req, 0) == (256, True)
    side.after_alloc(req, 256)
    req.num_computed_tokens = 256  # the load is done: vLLM schedules the rest
    side.after_alloc(req, 0)
    admitted = side._admitted["parked"]
    assert (admitted.hit.prefix, admitted.store, side.metrics.requests.total()) == (256, True, 1)
    assert side._decode_from["parked"] == 640  # where its prompt's store ends
    side.close()


def test_a_decoder_waits_for_the_kv_its_prefiller_stored_then_loads_it() -> None:
    """The prefiller said 256 tokens are stored; the cache has none yet (its store runs off its step): "not yet",
    asked again, until they are there."""
    cached = [0]
    side = scheduler(lambda tokens, salt, segment: cached[0], can_save=False, handoff_timeout_sec=30)
    req = handed_off("decode", 300, {"kvtier": {"cached_tokens": 256}})
    assert side.num_new_matched_tokens(req, 0) == (None, False)
    cached[0] = 256
    deadline = time.monotonic() + 5
    while (claimed := side.num_new_matched_tokens(req, 0)[0]) is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert claimed == 256
    side.close()


def test_a_decoder_stops_waiting_at_the_timeout_and_computes() -> None:
    side = scheduler(lambda tokens, salt, segment: 128, can_save=False, handoff_timeout_sec=0.2)
    req = handed_off("late", 300, {"kvtier": {"cached_tokens": 256}})
    started = time.monotonic()
    while (claimed := side.num_new_matched_tokens(req, 0)[0]) is None:
        assert time.monotonic() - started < 5
        time.sleep(0.005)
    assert claimed == 128 and time.monotonic() - started >= 0.2
    assert side.metrics.handoff_timeouts.total() == 1
    side.close()


@pytest.mark.parametrize(
    "params", [{"kvtier": {"cached_tokens": -1}}, {"kvtier": "x"}, {"kvtier": {"cached_tokens": True}}, []]
)
def test_hostile_transfer_params_are_ignored(params: object) -> None:
    side = scheduler(lambda tokens, salt, segment: 0, can_save=False)
    assert side.num_new_matched_tokens(handed_off("odd", 300, params), 0) == (0, False)
    side.close()


def test_a_prefiller_tells_the_proxy_how_much_of_the_prompt_the_cache_will_hold() -> None:
    side = scheduler(lambda tokens, salt, segment: 128, can_load=False)
    req = handed_off("prefill", 300, {"do_remote_decode": True})
    assert side.num_new_matched_tokens(req, 0) == (0, False)
    side.after_alloc(req, 0)
    assert side.finished(req, []) == (False, {"kvtier": {"cached_tokens": 256}})
    plain = request("plain", 300)  # no proxy asked: no parameters in the answer
    side.num_new_matched_tokens(plain, 0)
    side.after_alloc(plain, 0)
    assert side.finished(plain, []) == (False, None)
    side.close()


def generated(req: Request, num_output: int, status: RequestStatus) -> Request:
    """``req`` after it generated ``num_output`` tokens and ended with ``status``."""
    req.append_output_token_ids(list(range(10_000, 10_000 + num_output)))
    req.num_computed_tokens = req.num_tokens - 1  # the last sampled token never went through the model
    req.status = status
    return req


def test_save_decode_cache_stores_a_finished_requests_output_and_holds_its_blocks_until_copied() -> None:
    side = scheduler(lambda tokens, salt, segment: 0, save_decode_cache=True)
    req = request("turn", 300)
    side.num_new_matched_tokens(req, 0)
    side.after_alloc(req, 0)  # the prompt's own store covers its 2 whole chunks: [0, 256)
    assert side.finished(generated(req, 100, RequestStatus.FINISHED_LENGTH_CAPPED), [1, 2, 3, 4]) == (True, None)
    (op,) = side._decode_stores
    assert (op.skip, op.prefix_end, len(op.tokens), op.holds_blocks) == (256, 384, 399, True)
    assert op.tokens[300] == 10_000 and op.block_ids == [1, 2, 3, 4]
    assert not side._decode_from  # nothing else is kept for the request

    for status, num_output in ((RequestStatus.FINISHED_ABORTED, 100), (RequestStatus.FINISHED_STOPPED, 50)):
        other = request(f"other-{status}", 300)  # aborted; or its output ends inside the prompt's last chunk
        side.num_new_matched_tokens(other, 0)
        side.after_alloc(other, 0)
        assert side.finished(generated(other, num_output, status), [5]) == (False, None)
    assert len(side._decode_stores) == 1
    side.close()


def test_without_save_decode_cache_a_finished_request_frees_its_blocks() -> None:
    side = scheduler(lambda tokens, salt, segment: 0)
    req = request("turn", 300)
    side.num_new_matched_tokens(req, 0)
    side.after_alloc(req, 0)
    assert side.finished(generated(req, 100, RequestStatus.FINISHED_STOPPED), [1]) == (False, None)
    assert not side._decode_stores
    side.close()
