"""Blending through KVTierConnector in the real vLLM engine (SmolLM2-135M fp32 on the CPU): documents cached as
segments by one prompt are reused in another order by the next. At recompute ratio 1 the blended KV is a full
prefill's, so vLLM's greedy output must equal its output computing the prompt whole; at the default ratio it must
run, reuse the segments and store no blended KV as a prefix."""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import pytest
from test_engine import gen, run_driver, spec

from kvtier.integrations.models import is_prepared, model_path

pytest.importorskip("vllm", reason="vLLM is not installed")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(900),
    pytest.mark.skipif(not is_prepared(), reason="the model is not prepared: run `kvtier model prepare`"),
]

DOCS = [
    "The access code for vault Quintar is 4812. The vault lies under the old mill by the river Orr. " * 3,
    "Velmora Arbel was born in the city of Tressin, where she studied comets for twenty years. " * 3,
    "Project Halcyon has the codename Bluefin; it started in spring with forty engineers on board. " * 3,
]
QUESTION = "Question: What is the codename of Project Halcyon? Answer:"


@functools.cache
def joined(order: tuple[int, ...]) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_path()))
    separator = tok(" # # ", add_special_tokens=False).input_ids
    ids: list[int] = []
    for i, text in enumerate([*(DOCS[j] for j in order), QUESTION]):
        ids += ([*separator] if i else []) + tok(text, add_special_tokens=False).input_ids
    return ids


FIRST, REORDERED = joined((0, 1, 2)), joined((2, 0, 1))


def blending_extra(disk: Path, ratio: float) -> dict[str, Any]:
    return {
        "chunk_size": 16,
        "max_local_cpu_size": 0.5,
        "local_disk": str(disk),
        "max_local_disk_size": 1,
        "enable_blending": True,
        "blend_min_tokens": 32,
        "blend_recompute_ratios": ratio,
    }


def test_blending_in_vllm_reuses_reordered_documents(tmp_path: Path) -> None:
    # The reference: the reordered prompt under a cache_salt nothing was stored under, computed whole (a miss).
    reference = {**gen("reference", [REORDERED], 8), "cache_salt": "nothing-cached"}
    full = run_driver(
        tmp_path,
        spec(
            [reference, gen("first", [FIRST], 8), gen("reordered", [REORDERED], 8)], blending_extra(tmp_path / "a", 1.0)
        ),
    )
    assert full.tokens("reordered") == full.tokens("reference")
    assert not re.search(r"Retrieved [1-9]", full.log.split('"phase": "reference"')[0])  # it was computed
    assert re.search(r"Retrieved \d+ tokens \([^)]*3 segments, \d+ recomputed\), blended", full.log), full.log[-3000:]
    partial = run_driver(
        tmp_path,
        spec([gen("first", [FIRST], 8), gen("reordered", [REORDERED], 8)], blending_extra(tmp_path / "b", 0.15)),
    )
    blended = re.findall(r"3 segments, (\d+) recomputed\), blended (\d+) tokens", partial.log)
    assert blended and 0 < int(blended[0][0]) < int(blended[0][1]) // 2, partial.log[-3000:]
    assert len(partial.tokens("reordered")[0]) == 8
