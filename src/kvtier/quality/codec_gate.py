"""Measuring a lossy codec on a real model: what ``kvtier codec-gate`` records (``kvtier.codecs.gate``).

Each prompt of a fixed set runs twice through :class:`CachedCausalLM` over an engine whose only storage is a disk
tier encoding with the codec: once computed (exact KV, stored encoded on its way to disk) and once from the cache
(the prompt's KV decoded from disk, only its last tokens computed). Greedy decoding from the decoded KV is compared
with decoding from exact KV: the next-token distributions along exact KV's output (KL divergence, top-1), and how
many free-running generated tokens agree before the first difference.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from typing import Any

from kvtier.codecs.gate import GateRecord
from kvtier.codecs.registry import codec_named
from kvtier.config import load_config
from kvtier.integrations.transformers.cached_model import CachedCausalLM
from kvtier.quality.qa import make_qa_set
from kvtier.quality.scoring import kl_divergence

CHUNK_SIZE = 64  # small chunks: all but the last few tokens of each prompt come from the cache
MAX_PROMPT_TOKENS = 768
NEVER = -1  # an end-of-sequence token id no model emits


@dataclass(frozen=True, slots=True)
class PromptResult:
    first_token_kl: float
    mean_kl: float  # over the exact output's positions, teacher-forced
    top1_agreement: float  # positions whose most likely next token is exact KV's, teacher-forced
    greedy_agreement: float  # free-running greedy tokens equal before the first difference, as a fraction
    reused_tokens: int


def gate_prompts(tokenizer: Any, count: int = 6) -> list[list[int]]:
    """The fixed prompt set: the seeded QA set's contexts (invented facts in filler prose) with a question each,
    at most :data:`MAX_PROMPT_TOKENS` tokens."""
    prompts = []
    for context in make_qa_set(seed=0).contexts[:count]:
        question = context.questions[0]
        passages = [context.passages[i] for i in question.order]
        text = "\n\n".join(passages) + f"\n\nQuestion: {question.text}\nAnswer:"
        prompts.append(tokenizer(text).input_ids[-MAX_PROMPT_TOKENS:])
    return prompts


def measure(model: Any, tokenizer: Any, codec_name: str, model_name: str, *, prompts: int = 6,
            new_tokens: int = 24) -> GateRecord:  # fmt: skip
    codec = codec_named(codec_name)
    results: list[PromptResult] = []
    with tempfile.TemporaryDirectory(prefix="kvtier-codec-gate-") as disk:
        config = load_config(env={}, overrides={
            "chunk_size": CHUNK_SIZE, "local_cpu": False, "max_local_cpu_size": 0.5, "local_disk": disk,
            "max_local_disk_size": 4.0, "local_disk_serde": codec_name, "codec_gate": False,
        })  # fmt: skip
        with CachedCausalLM(model, config=config, model_name=model_name, tokenizer=tokenizer) as lm:
            engine = lm.backend.engine  # type: ignore[attr-defined]
            for ids in gate_prompts(tokenizer, prompts):
                results.append(_measure_prompt(lm, engine, ids, new_tokens))
            stored = sum(t.usage().used_bytes for t in engine.storage.lower)
            raw = sum(r.reused_tokens for r in results) * lm.layout.bytes_per_token
    return GateRecord(
        model=model_name,
        codec=codec.name,
        codec_version=codec.version,
        dtype=str(lm.layout.dtype),
        prompts=len(results),
        new_tokens=new_tokens,
        first_token_kl=_mean(r.first_token_kl for r in results),
        mean_kl=_mean(r.mean_kl for r in results),
        top1_agreement=_mean(r.top1_agreement for r in results),
        greedy_agreement=_mean(r.greedy_agreement for r in results),
        compression_ratio=raw / max(1, stored),
    )


def _measure_prompt(lm: CachedCausalLM, engine: Any, ids: list[int], new_tokens: int) -> PromptResult:
    exact_prefill = lm.prefill(ids)  # a miss: exact KV, computed; stored encoded on its way to disk
    if exact_prefill.reused_tokens:
        raise RuntimeError("the codec gate's prompt was cached before it was measured")
    engine.flush(60)
    # Exact KV's greedy output, past any end of turn (more positions to compare than a short answer has), and
    # its next-token logits at each position: the teacher-forced reference, from the same forward passes.
    output, exact = _greedy(lm, exact_prefill, new_tokens)
    cached_prefill = lm.prefill(ids)
    if cached_prefill.reused_tokens == 0:
        raise RuntimeError("the codec gate's prompt was not served from the cache")
    decoded = _teacher_forced(lm, cached_prefill, output)
    kls = [kl_divergence(e, d) for e, d in zip(exact, decoded, strict=True)]
    top1 = sum(int(e.argmax() == d.argmax()) for e, d in zip(exact, decoded, strict=True)) / len(output)
    greedy = lm.generate(ids, new_tokens, eos_token_id=NEVER).token_ids  # free-running from decoded KV
    return PromptResult(kls[0], _mean(kls), top1, _agreeing(output, greedy) / len(output), cached_prefill.reused_tokens)


def _greedy(lm: CachedCausalLM, prefill: Any, new_tokens: int) -> tuple[list[int], list[Any]]:
    """``new_tokens`` greedy tokens after ``prefill``'s prompt, and the next-token logits each was chosen from."""
    import torch

    logits, tokens = [prefill.logits], []
    with torch.no_grad():
        while True:
            tokens.append(int(logits[-1].argmax()))
            if len(tokens) == new_tokens:
                return tokens, logits
            step = torch.tensor([tokens[-1:]], dtype=torch.long, device=lm.device)
            logits.append(lm.model(input_ids=step, past_key_values=prefill.cache, use_cache=True).logits[0, -1].float())


def _teacher_forced(lm: CachedCausalLM, prefill: Any, output: list[int]) -> list[Any]:
    """The next-token logits at each position of ``output`` after ``prefill``'s prompt (its tokens fed in)."""
    import torch

    if len(output) == 1:
        return [prefill.logits]
    with torch.no_grad():
        step = torch.tensor([output[:-1]], dtype=torch.long, device=lm.device)
        rest = lm.model(input_ids=step, past_key_values=prefill.cache, use_cache=True).logits[0].float()
    return [prefill.logits, *rest]


def _mean(values: Any) -> float:
    items = list(values)
    return sum(items) / len(items)


def _agreeing(exact: list[int], other: list[int]) -> int:
    """How many tokens of ``other`` equal ``exact``'s before the first difference."""
    for i, token in enumerate(exact):
        if i >= len(other) or other[i] != token:
            return i
    return len(exact)
