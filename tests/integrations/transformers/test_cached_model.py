"""kvtier under a real transformers model: reused KV must give the output of recomputing it.

Every check compares against the same model run without the cache: greedy tokens equal token for token, and
last-position logits within 1e-4 (fp32), for zero, partial and full hits, from memory, disk and the server.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import CHUNK, make_config, tiny_llama
from kvtier.integrations.backend import InProcessBackend, ServerBackend
from kvtier.integrations.transformers import CachedCausalLM, kv_layout_of

NEW_TOKENS = 6
LOGITS_TOLERANCE = 1e-4


def prompt(tokenizer: Any, num_tokens: int, seed: int = 0) -> list[int]:
    """``num_tokens`` tokens of natural language (real text, so the model's outputs are real)."""
    topics = ["rivers", "bread", "violins", "glaciers", "harbours", "bees", "comets", "libraries"]
    text = " ".join(
        f"Note {i}: {topics[(i + seed) % len(topics)]} change slowly over the years." for i in range(num_tokens)
    )
    return tokenizer(text)["input_ids"][:num_tokens]


class Baseline:
    """Generations of the model without any cache, computed once per prompt."""

    def __init__(self, model: Any) -> None:
        self.lm = CachedCausalLM(model, InProcessBackend(make_config(), kv_layout_of(model), model_name="baseline"))
        self._seen: dict[tuple[int, ...], Any] = {}

    def __call__(self, ids: list[int]) -> Any:
        key = tuple(ids)
        if key not in self._seen:
            self._seen[key] = self.lm.generate(ids, NEW_TOKENS, use_cache=False)
        return self._seen[key]


@pytest.fixture(scope="module")
def baseline(smollm2: Any) -> Baseline:
    return Baseline(smollm2)


def assert_same_output(lm: CachedCausalLM, baseline: Baseline, ids: list[int], reused: int) -> Any:
    got = lm.generate(ids, NEW_TOKENS)
    want = baseline(ids)
    assert got.prefill.reused_tokens == reused, (len(ids), got.prefill)
    assert got.token_ids == want.token_ids
    assert float((got.prefill.logits - want.prefill.logits).abs().max()) <= LOGITS_TOLERANCE
    return got


def expected_reuse(cached_tokens: int, prompt_tokens: int) -> int:
    """Chunks are reused whole; the last prompt token is always computed (its logits are the output)."""
    return min(cached_tokens - cached_tokens % CHUNK, prompt_tokens - 1)


def test_uncached_generation_matches_transformers_generate(smollm2: Any, smollm2_tokenizer: Any) -> None:
    ids = prompt(smollm2_tokenizer, 40)
    lm = CachedCausalLM(smollm2, InProcessBackend(make_config(), kv_layout_of(smollm2), model_name="m"))
    ours = lm.generate(ids, NEW_TOKENS, use_cache=False).token_ids
    with torch.inference_mode():
        theirs = smollm2.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False)[0, len(ids) :]
    assert ours == theirs.tolist()[: len(ours)]
    lm.close()


def check_hits(
    store: CachedCausalLM, reopen: Callable[[], CachedCausalLM], baseline: Baseline, tokenizer: Any, tier: str
) -> None:
    """``store`` runs prompts first and is closed; ``reopen()`` (a fresh process's view of the tier) must hit them."""
    short = prompt(tokenizer, CHUNK * 4 + 5, seed=1)  # not a multiple of the chunk size
    aligned = prompt(tokenizer, CHUNK * 5, seed=2)  # a full-prompt hit next time
    tiny = prompt(tokenizer, CHUNK - 3, seed=3)  # shorter than one chunk: never cached
    for ids in (short, aligned, tiny):
        assert_same_output(store, baseline, ids, reused=0)
    store.close()  # an in-process engine finishes its disk writes

    with reopen() as load:
        got = assert_same_output(load, baseline, short, reused=expected_reuse(len(short), len(short)))
        assert got.prefill.tier_tokens == {tier: CHUNK * 4}
        assert_same_output(load, baseline, aligned, reused=len(aligned) - 1)  # full hit: one token computed
        assert_same_output(load, baseline, tiny, reused=0)  # zero hit
        extended = short + prompt(tokenizer, 23, seed=4)  # partial hit: the stored head, then new text
        assert_same_output(load, baseline, extended, reused=CHUNK * 4)


def test_hits_from_memory(smollm2: Any, smollm2_tokenizer: Any, baseline: Baseline) -> None:
    lm = CachedCausalLM(smollm2, config=make_config(), model_name="m")
    backend = lm.backend
    lm._owns_backend = False  # the "reopened" model shares this process's memory tier
    check_hits(lm, lambda: CachedCausalLM(smollm2, backend), baseline, smollm2_tokenizer, "memory")
    backend.close()


def test_hits_from_disk_after_restart(smollm2: Any, smollm2_tokenizer: Any, baseline: Baseline, tmp_path: Path) -> None:
    config = make_config(local_disk=str(tmp_path / "disk"), max_local_disk_size=0.5)
    first = CachedCausalLM(smollm2, config=config, model_name="m")
    check_hits(
        first, lambda: CachedCausalLM(smollm2, config=config, model_name="m"), baseline, smollm2_tokenizer, "disk"
    )


def test_hits_through_the_server(smollm2: Any, smollm2_tokenizer: Any, baseline: Baseline, thread_server: Any) -> None:
    config = make_config(server_url=thread_server().url)
    first = CachedCausalLM(smollm2, config=config, model_name="m")
    assert isinstance(first.backend, ServerBackend)
    check_hits(
        first, lambda: CachedCausalLM(smollm2, config=config, model_name="m"), baseline, smollm2_tokenizer, "memory"
    )


def test_tenants_do_not_share(smollm2: Any, smollm2_tokenizer: Any, baseline: Baseline) -> None:
    ids = prompt(smollm2_tokenizer, 50, seed=5)
    with CachedCausalLM(smollm2, config=make_config(), model_name="m", cache_salt="alice") as alice:
        assert_same_output(alice, baseline, ids, reused=0)
        bob = CachedCausalLM(smollm2, alice.backend, cache_salt="bob")
        assert_same_output(bob, baseline, ids, reused=0)
        assert_same_output(alice, baseline, ids, reused=expected_reuse(50, 50))


def test_verify_mode_recomputes_hits_and_reports_the_difference(
    smollm2: Any, smollm2_tokenizer: Any, baseline: Baseline
) -> None:
    ids = prompt(smollm2_tokenizer, 70, seed=6)
    with CachedCausalLM(smollm2, config=make_config(verify_sample_rate=1.0), model_name="m") as lm:
        assert lm.prefill(ids).verification is None  # a miss has nothing to verify
        hit = lm.prefill(ids)
        assert hit.reused_tokens == 64
        assert hit.verification is not None
        assert hit.verification.logits_max_abs_diff <= LOGITS_TOLERANCE
        assert hit.verification.kv_max_abs_diff <= LOGITS_TOLERANCE
        text = lm.metrics.render()
        assert "kvtier_verify_checks_total 1" in text
        assert 'kvtier_verify_max_abs_diff{what="logits"}' in text


def test_server_down_means_recompute_then_hits_resume(
    smollm2: Any, smollm2_tokenizer: Any, baseline: Baseline, thread_server: Any
) -> None:
    down = thread_server()
    port = down.port
    down.stop()
    ids = prompt(smollm2_tokenizer, 40, seed=7)
    config = make_config(server_url=f"tcp://127.0.0.1:{port}", server_timeout_sec=0.3)
    with CachedCausalLM(smollm2, config=config, model_name="m") as lm:
        assert_same_output(lm, baseline, ids, reused=0)
        assert_same_output(lm, baseline, ids, reused=0)  # nothing could be stored: still a miss, still right
        assert lm.metrics.backend_errors.total() >= 2
        thread_server(port=port)
        assert_same_output(lm, baseline, ids, reused=0)  # stores now
        assert_same_output(lm, baseline, ids, reused=32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_random_llama_dtypes_reuse_exact_kv(dtype: Any) -> None:
    model = tiny_llama(dtype)
    ids = list(range(3, 3 + CHUNK * 3 + 7))
    with CachedCausalLM(model, config=make_config(verify_sample_rate=1.0), model_name="tiny") as lm:
        assert kv_layout_of(model).num_kv_heads == 2
        cold = lm.generate(ids, 4)
        warm = lm.generate(ids, 4)
        assert warm.prefill.reused_tokens == CHUNK * 3
        assert warm.prefill.verification is not None
        assert warm.prefill.verification.kv_max_abs_diff == 0.0  # the loaded KV is bit-identical
        tolerance = 1e-5 if dtype == torch.float32 else 5e-2
        assert float((cold.prefill.logits - warm.prefill.logits).abs().max()) <= tolerance


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_model_reuses_kv() -> None:
    model = tiny_llama(torch.float16, "cuda")
    ids = list(range(3, 3 + CHUNK * 4 + 1))
    with CachedCausalLM(model, config=make_config(verify_sample_rate=1.0), model_name="tiny") as lm:
        cold = lm.generate(ids, 4)
        warm = lm.generate(ids, 4)
        assert warm.prefill.reused_tokens == CHUNK * 4
        assert warm.prefill.verification.kv_max_abs_diff == 0.0
        assert warm.token_ids == cold.token_ids


def test_rejects_a_batch_of_prompts() -> None:
    with CachedCausalLM(tiny_llama(), config=make_config(), model_name="tiny") as lm, pytest.raises(ValueError):
        lm.prefill([[1, 2, 3], [4, 5, 6]])
