"""Blending (CacheBlend) through the real SmolLM2 model: segments cached by content and reused anywhere.

What must hold exactly: keys moved between positions equal the keys the model computes there; recompute ratio 1
is a full prefill; ratio 0 uses the stored KV as it is; a blended prompt never stores approximate KV as prefix
chunks; models whose RoPE cannot be moved are refused. Quality in between is measured in
``benchmarks/bench_blend.py`` (``docs/benchmarks.md``), not asserted here.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from conftest import make_config, tiny_llama
from kvtier.integrations.backend import InProcessBackend, ServerBackend
from kvtier.integrations.models import model_path
from kvtier.integrations.transformers import CachedCausalLM, kv_layout_of
from kvtier.integrations.transformers.rope import RotaryKeys, UnsupportedModel
from kvtier.tokens.segments import Segment

LOGITS_TOLERANCE = 1e-4
DOCS = [
    "The access code for vault Quintar is 4812. The vault lies under the old mill by the river Orr. " * 2,
    "Velmora Arbel was born in the city of Tressin, where she studied comets for twenty years. " * 2,
    "Project Halcyon has the codename Bluefin; it started in spring with forty engineers on board. " * 2,
    "The lighthouse at Cape Dunmore was painted red in 1911 and its lamp burns whale oil no more. " * 2,
]
QUESTION = "Question: What is the codename of Project Halcyon? Answer:"


def blending(**overrides: Any) -> Any:
    return make_config(enable_blending=True, blend_min_tokens=16, **overrides)


def lm_with(smollm2, tokenizer, backend=None, **overrides: Any) -> CachedCausalLM:  # type: ignore[no-untyped-def]
    config = blending(**overrides)
    backend = backend or InProcessBackend(config, kv_layout_of(smollm2), model_name="smollm2")
    return CachedCausalLM(smollm2, backend, config=config, tokenizer=tokenizer)


# -- moving keys --------------------------------------------------------------------------------------------
def test_keys_turned_from_one_position_to_another_equal_keys_computed_there(smollm2) -> None:
    """The model's own RoPE at p, turned back and to q, against the model's own RoPE at q (fp32)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    rotary = RotaryKeys(smollm2)
    raw = torch.randn(1, 3, 40, 64)  # (batch, kv heads, tokens, head_dim): pre-rotation keys
    p, q = torch.arange(100, 140), torch.arange(2990, 3030)
    at_p = apply_rotary_pos_emb(raw, raw, *smollm2.model.rotary_emb(raw, p[None]))[1]
    at_q = apply_rotary_pos_emb(raw, raw, *smollm2.model.rotary_emb(raw, q[None]))[1]
    as_stored = at_p[0].transpose(0, 1)  # kvtier's (tokens, heads, head_dim)
    moved = rotary.turn(rotary.turn(as_stored, p, back=True), q)
    assert float((moved - at_q[0].transpose(0, 1)).abs().max()) < 1e-5


def test_the_first_layers_keys_of_a_text_moved_equal_the_models_at_the_new_offset(smollm2, smollm2_tokenizer) -> None:
    """Layer 0's keys depend on the token and its position only: computed after 17 filler tokens and moved to
    after 201, they equal the model's own keys there."""
    text = smollm2_tokenizer(DOCS[0], add_special_tokens=False).input_ids
    rotary = RotaryKeys(smollm2)

    def layer0_keys(offset: int) -> torch.Tensor:
        ids = torch.tensor([[50] * offset + text])
        with torch.inference_mode():
            cache = smollm2(input_ids=ids, use_cache=True).past_key_values
        return cache.layers[0].keys[0, :, offset:].transpose(0, 1)  # (tokens, heads, head_dim)

    n = len(text)
    moved = rotary.turn(rotary.turn(layer0_keys(17), torch.arange(17, 17 + n), back=True), torch.arange(201, 201 + n))
    assert float((moved - layer0_keys(201)).abs().max()) < 1e-4


# -- the blended prefill ------------------------------------------------------------------------------------
def stored_then_reordered(lm: CachedCausalLM, order: list[int]) -> tuple[list[int], Any]:
    """Prefill the docs in their order (storing them), then the prompt in ``order``; its ids and prefill."""
    first, _ = lm.join([*DOCS, QUESTION])
    lm.prefill(first)
    ids, _ = lm.join([*(DOCS[i] for i in order), QUESTION])
    return ids, lm.prefill(ids)


def test_recompute_ratio_one_is_a_full_prefill(smollm2, smollm2_tokenizer) -> None:
    lm = lm_with(smollm2, smollm2_tokenizer, blend_recompute_ratios=1.0)
    ids, got = stored_then_reordered(lm, [2, 0, 3, 1])
    assert (
        got.blended
        and got.segments_reused == 4
        and got.recomputed_tokens == sum(s.num_tokens for s in got.segments[:4])
    )
    full = lm.prefill(ids, use_cache=False)
    assert float((got.logits - full.logits).abs().max()) <= LOGITS_TOLERANCE
    blended_tokens = lm.generate(ids, 8).token_ids
    assert blended_tokens == lm.generate(ids, 8, use_cache=False).token_ids
    lm.close()


def test_recompute_ratio_zero_uses_the_stored_kv_as_it_is(smollm2, smollm2_tokenizer) -> None:
    """Every loaded token's KV in the cache is the stored segment KV turned to its new position."""
    lm = lm_with(smollm2, smollm2_tokenizer, blend_recompute_ratios=0.0)
    ids, got = stored_then_reordered(lm, [3, 1, 0, 2])
    assert got.blended and got.recomputed_tokens == 0
    for piece in got.segments[:4]:
        stored = torch.empty(lm.layout.chunk_shape(piece.num_tokens))
        loaded = lm.backend.retrieve(np.asarray(ids[piece.start : piece.end]), stored, segment=True)
        assert loaded.loaded_end == piece.num_tokens
        keys = lm.blender.rotary.turn(stored[:, 0], torch.arange(piece.start, piece.end))  # type: ignore[union-attr]
        for layer in range(lm.layout.num_layers):
            cached = got.cache.layers[layer]
            assert torch.equal(cached.keys[0, :, piece.start : piece.end].transpose(0, 1), keys[layer])
            assert torch.equal(cached.values[0, :, piece.start : piece.end].transpose(0, 1), stored[layer, 1])
    lm.close()


def test_a_blended_prompt_stores_prefix_chunks_only_where_its_kv_is_exact(smollm2, smollm2_tokenizer) -> None:
    """A system text cached as a prefix, then reordered documents: the prefix is an exact hit, the documents are
    blended; what the blended prompt stores as prefix chunks ends before its first blended document, so no later
    prefix hit can serve approximate KV."""
    lm = lm_with(smollm2, smollm2_tokenizer)
    system = "You are a careful assistant. Answer from the documents only, in as few words as you can. " * 2
    first, _ = lm.join([system, *DOCS[:3], QUESTION])
    lm.prefill(first)
    ids, pieces = lm.join([system, DOCS[2], DOCS[0], DOCS[1], QUESTION])
    got = lm.prefill(ids)
    chunk = lm.backend.chunk_size
    prefix_hit = pieces[0].end - pieces[0].end % chunk  # the system text's whole chunks; its tail is a segment's
    assert got.blended and got.segment_hits[1:4] == [p.num_tokens for p in pieces[1:4]]
    assert got.exact_tokens == prefix_hit
    assert lm.backend.lookup(np.asarray(ids)) == prefix_hit  # nothing approximate was stored as a prefix
    lm.close()


def test_missing_and_partly_cached_segments(smollm2, smollm2_tokenizer) -> None:
    """A document never seen is computed fresh (and stored); one that grew keeps its cached whole chunks."""
    lm = lm_with(smollm2, smollm2_tokenizer, blend_recompute_ratios=0.15)
    first, _ = lm.join([DOCS[0], DOCS[1], QUESTION])
    lm.prefill(first)
    grown = DOCS[1] + "She also kept bees. " * 3
    ids, pieces = lm.join([grown, DOCS[3], DOCS[0], QUESTION])
    got = lm.prefill(ids)
    chunk = lm.backend.chunk_size
    assert got.segments_reused == 2  # the grown one in part, DOCS[0] whole; DOCS[3] and the question missed
    assert chunk <= got.segment_hits[0] < pieces[0].num_tokens and got.segment_hits[0] % chunk == 0
    assert got.segment_hits[1] == 0 and got.segment_hits[2] == pieces[2].num_tokens
    again = lm.prefill(ids)  # everything it lacked was stored: now every document is found whole
    assert again.segment_hits[:3] == [p.num_tokens for p in pieces[:3]]
    lm.close()


def test_a_separator_inside_a_text_cuts_it_into_two_segments_found_again(smollm2, smollm2_tokenizer) -> None:
    lm = lm_with(smollm2, smollm2_tokenizer)
    tok = lambda text: smollm2_tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    sep = lm.separator
    inner = [*tok(DOCS[0]), *sep, *tok(DOCS[1])]  # one "text" that holds the separator's ids
    first = [*inner, *sep, *tok(DOCS[2]), *sep, *tok(QUESTION)]
    stored = lm.prefill(first)
    assert len(stored.segments) == 3  # DOCS[0], DOCS[1], DOCS[2] (the question is under blend_min_tokens)
    ids = [*tok(DOCS[2]), *sep, *inner, *sep, *tok(QUESTION)]
    got = lm.prefill(ids)
    assert got.segments_reused == 3 and got.segment_hits == [s.num_tokens for s in got.segments]
    lm.close()


def test_explicit_segment_boundaries(smollm2, smollm2_tokenizer) -> None:
    """Segments given as token ranges: no separator needed."""
    lm = lm_with(smollm2, smollm2_tokenizer)
    a, b = (smollm2_tokenizer(d, add_special_tokens=False).input_ids for d in DOCS[:2])
    q = smollm2_tokenizer(QUESTION, add_special_tokens=False).input_ids
    lm.prefill([*a, *b, *q], segments=[(0, len(a)), (len(a), len(a) + len(b))])
    got = lm.prefill([*b, *a, *q], segments=[(0, len(b)), (len(b), len(a) + len(b))])
    assert got.segments_reused == 2 and got.segments == [Segment(0, len(b)), Segment(len(b), len(a) + len(b))]
    lm.close()


SEGMENT_READER = textwrap.dedent(
    """
    import sys, json
    from kvtier.config import load_config
    from kvtier.integrations.transformers import CachedCausalLM
    url, path, prompt = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    config = load_config(env={}, overrides={"chunk_size": 16, "enable_blending": True, "blend_min_tokens": 16,
                                            "server_url": url})
    with CachedCausalLM.from_pretrained(path, config=config) as lm:
        got = lm.prefill(prompt)
        print(json.dumps({"reused": got.segments_reused, "tiers": got.tier_tokens}))
    """
)


def test_segments_stored_by_one_process_are_blended_by_another_through_the_server(
    smollm2, smollm2_tokenizer, tmp_path: Path
) -> None:
    import json

    from servers import ThreadServer

    server = ThreadServer(tmp_path / "disk")
    try:
        config = blending(server_url=server.url)
        backend = ServerBackend(config, kv_layout_of(smollm2), model_name="smollm2-135m-instruct")
        lm = CachedCausalLM(smollm2, backend, config=config, tokenizer=smollm2_tokenizer)
        first, _ = lm.join([*DOCS[:3], QUESTION])
        lm.prefill(first)
        ids, _ = lm.join([DOCS[1], DOCS[2], DOCS[0], QUESTION])
        lm.close()
        done = subprocess.run(
            [sys.executable, "-c", SEGMENT_READER, server.url, str(model_path()), json.dumps(ids)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        answer = json.loads(done.stdout.strip().splitlines()[-1])
        assert answer["reused"] == 3 and sum(answer["tiers"].values()) > 0
    finally:
        server.stop()


# -- refused models -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}}, "dynamic"),
        (
            {
                "rope_parameters": {
                    "rope_type": "longrope",
                    "rope_theta": 10000.0,
                    "short_factor": [1.0] * 8,
                    "long_factor": [1.0] * 8,
                    "original_max_position_embeddings": 512,
                }
            },
            "longrope",
        ),
    ],
    ids=["dynamic RoPE", "longrope"],
)
def test_models_whose_rope_cannot_be_moved_are_refused_with_the_reason(change, reason) -> None:  # type: ignore[no-untyped-def]
    model = tiny_llama()
    for key, value in change.items():
        setattr(model.config, key, value)
    from transformers import LlamaForCausalLM

    refused = LlamaForCausalLM(model.config)
    with pytest.raises(UnsupportedModel, match=reason):
        CachedCausalLM(refused, config=blending())


def test_a_model_outside_the_llama_family_is_refused_by_name() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=128)).eval()
    with pytest.raises(UnsupportedModel, match="gpt2"):
        CachedCausalLM(model, config=blending())
